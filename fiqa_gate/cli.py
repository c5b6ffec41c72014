"""The `fiqa-gate` command line.

Machine-readable results go to a file or stdout (CSV); progress and summaries go to
stderr. Exit codes: 0 success, 1 some inputs failed, 2 usage error or an output that
cannot be written, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fiqa_gate import registry
from fiqa_gate.assets import is_temp_name, temp_file
from fiqa_gate.errors import (
    FiqaGateError,
    GalleryError,
    ImageLoadError,
    NoFaceError,
    caused_by_interrupt,
    one_line,
)
from fiqa_gate.images import identity_folders, iter_files
from fiqa_gate.manifest import ENROLL_COLUMNS, FILTER_COLUMNS, SCORE_COLUMNS, SEARCH_COLUMNS

if TYPE_CHECKING:
    from fiqa_gate.components import Detector, Recognizer
    from fiqa_gate.faces import Face
    from fiqa_gate.gallery import Enrollment
    from fiqa_gate.gate import Gate
    from fiqa_gate.manifest import Manifest

log = logging.getLogger("fiqa_gate")

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])



class Failures:
    """Counts per-input failures to pick the exit code."""

    def __init__(self) -> None:
        self.count = 0

    def exit(self) -> None:
        sys.exit(1 if self.count else 0)


def _progress(items: Sequence[_T], desc: str) -> Iterable[_T]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file", file=sys.stderr, disable=None,
                dynamic_ncols=True)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, (ImageLoadError, NoFaceError)):  # the path is the row's own
        return exc.reason
    if isinstance(exc, FiqaGateError):  # written to be read: no class name before it
        return " ".join(str(exc).split())
    return one_line(exc)


def _listed(paths: Sequence[str], files: Iterable[str], manifest: str) -> list[str]:
    """The input files, each once however the arguments spell its folder (a link to a
    file stays an input of its own), without the run's own manifest: a manifest written
    into an input folder, by -o or by redirecting stdout, is not an input."""
    seen: set[str] = set()
    kept = []
    for f in _not_own(files, manifest):
        where = _where(f)
        if where not in seen:
            seen.add(where)
            kept.append(f)
    if not kept:
        log.warning("no files under %s", ", ".join(paths))
    return kept


def _not_own(files: Iterable[str], output: str) -> Iterator[str]:
    """`files` without the file `output` writes to ("-": stdout), by device and inode."""
    own = _file_id(output)
    return iter(files) if own is None else (f for f in files if _file_id(f) != own)


def _where(path: str) -> str:
    """A file's path with its folder resolved (before "..", which may leave a linked
    folder): one string for every spelling of the same place."""
    return os.path.join(_real_folder(os.path.dirname(path) or "."), os.path.basename(path))


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    # a folder's files share it: resolved once, not once per file and again on resume
    return os.path.realpath(folder)


def _not_done(files: Sequence[str], done: set[str]) -> list[str]:
    """The files a resumed manifest does not hold yet, however either spelled the path."""
    finished = {_where(d) for d in done}
    return [f for f in files if _where(f) not in finished]


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of a file, or of a regular file stdout ("-") writes to."""
    try:
        st = os.fstat(sys.stdout.fileno()) if path == "-" else os.stat(path)
    except (OSError, ValueError, AttributeError):  # gone, or stdout closed or fd-less
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _relpath(path: str, roots: Sequence[str]) -> str:
    for root in roots:
        if os.path.isdir(root):
            rel = os.path.relpath(path, root)
            if rel != os.pardir and not rel.startswith(os.pardir + os.sep):  # not "..sub/"
                return rel
    return os.path.basename(path)


# -- shared options ---------------------------------------------------------------------
def pipeline_options(fn: _F) -> _F:
    for opt in reversed([
        click.option("--aligned", is_flag=True,
                     help="Inputs are already aligned square face crops (112x112 as the "
                          "gate makes them; other square sizes are resized): no "
                          "detection."),
        click.option("--scorer", default=registry.DEFAULT_SCORER, show_default=True,
                     help="Quality scorer (see `fiqa-gate plugins`)."),
        click.option("--model", type=click.Path(dir_okay=False),
                     help="A student model file (.onnx with its .json) instead of the shipped."),
        click.option("--detector", default=registry.DEFAULT_DETECTOR, show_default=True),
        click.option("--recognizer", default=registry.DEFAULT_RECOGNIZER, show_default=True,
                     help="Recognizer the score is calibrated for / embeddings come from."),
        click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
                     help="A `fiqa-gate calibrate` file: the scorer's map to P(match) for "
                          "--recognizer, instead of the shipped one (SFace's)."),
    ]):
        fn = opt(fn)
    return fn


class Pipeline:
    """What a command needs: the detector (unless aligned) and the scorer (if it scores),
    for the recognizer the scores are meant for."""

    def __init__(self, aligned: bool, scorer: str | None, model: str | None, detector: str,
                 recognizer: str, calibration: str | None = None) -> None:
        self.detector = None if aligned else registry.get_detector(detector)
        self.detector_name = detector
        self.recognizer = recognizer
        self.scorer = None
        if scorer is not None:
            ctx = registry.ScorerContext(recognizer_name=recognizer,
                                         options={"model": model} if model else {})
            self.scorer = registry.get_scorer(scorer, ctx)
            if calibration is not None:
                from fiqa_gate.calibration import load_fitted

                self.scorer.calibration = load_fitted(calibration, scorer, recognizer, model)
            calibrated_for = self.scorer.calibrated_for
            if calibrated_for is not None and calibrated_for != recognizer:
                log.warning("scorer %r is calibrated for %s, not %s: its score is the chance "
                            "of a match with %s; fit its map for %s (`fiqa-gate calibrate "
                            "--recognizer %s`, then --calibration FILE) before trusting a "
                            "threshold", scorer, calibrated_for, recognizer, calibrated_for,
                            recognizer, recognizer)

    def faces(self, path: str) -> list[Face]:
        from fiqa_gate.pipeline import faces_from_file

        return faces_from_file(path, self.detector)

    def gate(self, threshold: float, stage: str) -> Gate:
        """A Gate on this pipeline's scorer; a threshold needs the calibrated scale."""
        from fiqa_gate.gate import Gate

        assert self.scorer is not None
        if self.scorer.calibration is None:
            raise click.UsageError(
                f"scorer {self.scorer.name!r} has no calibration for recognizer "
                f"{self.recognizer!r}, so its scores are not on the [0, 1] scale a "
                "threshold is set on; fit one (fiqa-gate calibrate --recognizer "
                f"{self.recognizer} --scorer {self.scorer.name} -o FILE, then --calibration "
                "FILE), or gate with a recognizer it ships a calibration for (sface or dlib, "
                "for the built-in ones)")
        return Gate(self.scorer, threshold, stage=stage, detector=self._checking_detector())

    def _checking_detector(self) -> Detector | None:
        """The detector that checks a rejected face's alignment, aligned inputs too; for
        those a detector that cannot load costs the check, not the run."""
        if self.detector is not None:
            return self.detector
        try:
            return registry.get_detector(self.detector_name)
        except Exception as exc:
            log.warning("no alignment check of rejected faces: detector %r: %s",
                        self.detector_name, one_line(exc))
            return None


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FiqaGateError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # what was written stays; --resume or a rerun goes on
            _interrupted()
        except OSError as exc:
            _os_error(exc)
        except Exception as exc:
            if caused_by_interrupt(exc):  # ONNX Runtime wraps one in its ImportError
                _interrupted()
            raise


def _os_error(exc: OSError) -> None:
    """What the system refused, said in a line (exit 2), not as a traceback: a stdout on a
    full disk, a working folder deleted under the run. A closed pipe stays click's."""
    if exc.errno == errno.EPIPE:
        raise exc
    log.debug("the system's error", exc_info=exc)
    try:
        os.getcwd()
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}"
    except FileNotFoundError:
        message = "the working folder no longer exists; run from one that does"
    with contextlib.suppress(OSError):
        click.echo(f"Error: {message}", err=True)
    sys.exit(2)


def _interrupted() -> None:
    import signal

    with contextlib.suppress(ValueError):  # (only the main thread may; it is the one here)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing now
    with contextlib.suppress(OSError):
        click.echo("Interrupted.", err=True)
    sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="fiqa-gate")
@click.option("--no-plugins", is_flag=True,
              help="Load first-party plugins only (also FIQA_GATE_NO_PLUGINS=1).")
@click.option("-v", "--verbose", count=True, help="More logging on stderr.")
def cli(no_plugins: bool, verbose: int) -> None:
    """Face image quality gate for face-recognition pipelines."""
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else
                        logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# -- score --------------------------------------------------------------------------------
@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-o", "--output", default="-", show_default=True,
              help="CSV file to write ('-' for stdout).")
@click.option("--resume", is_flag=True, help="Append to OUTPUT, skipping files already in it.")
@pipeline_options
def score(paths: tuple[str, ...], output: str, resume: bool, aligned: bool, scorer: str,
          model: str | None, detector: str, recognizer: str, calibration: str | None
          ) -> None:
    """Score every image file under PATHS: one CSV row per face (or per failed file)."""
    from fiqa_gate.manifest import open_manifest

    pipe = Pipeline(aligned, scorer, model, detector, recognizer, calibration)
    if pipe.scorer is not None and pipe.scorer.calibration is None:  # gates refuse it
        log.warning("scorer %r has no calibration for recognizer %r: its score is its raw "
                    "output clipped to [0, 1]", scorer, recognizer)
    failures = Failures()
    files = _listed(paths, iter_files(paths), output)
    inputs = {_where(f) for f in files}
    with open_manifest(output, SCORE_COLUMNS, resume=resume, multi_row=True,
                       check=lambda rows: _same_folder(output, rows, files, inputs),
                       mine=lambda path: _where(path) in inputs) as manifest:
        failures.count += _failed_before(manifest.done_rows, inputs)
        for path in _progress(_not_done(files, manifest.done), "score"):
            try:
                faces = pipe.faces(path)
                scores = pipe.scorer.score(faces)
            except Exception as exc:  # one bad file never stops the run
                failures.count += 1
                manifest.write_rows([{"path": path, "error": _error_text(exc)}])
                continue
            rows = []
            for face, cal, raw in zip(faces, scores.calibrated, scores.raw, strict=True):
                det = face.detection
                box = det.box if det else (None,) * 4
                rows.append({"path": path, "score": f"{cal:.6f}", "raw_score": f"{raw:.6f}",
                             "face": face.index,
                             **{k: ("" if v is None else f"{v:.1f}")
                                for k, v in zip(("box_x", "box_y", "box_w", "box_h"), box,
                                                strict=True)},
                             "det_score": "" if det is None else f"{det.score:.4f}",
                             "error": ""})
            manifest.write_rows(rows)
    click.echo(f"scored {len(files)} files, {failures.count} failed", err=True)
    failures.exit()


# -- filter -------------------------------------------------------------------------------
def _place_copy(src: str, dest: Path, move: bool) -> tuple[str, os.stat_result | None]:
    """Copy src to dest via a temporary file and an atomic, non-overwriting link. With
    `move`, also the stat of src as copied (`_check_unchanged` passed): the caller removes
    src after the manifest row saying so is written, so a failed write never leaves a
    moved file without its row."""
    if is_temp_name(dest.name):  # a later run would take it for a killed run's leftover
        raise OSError(f"{dest.name} is named as fiqa-gate's temporary files are; rename it")
    if move:
        _check_removable(src)  # a move that cannot finish copies nothing
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(dest.parent, ".part")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            copied = os.fstat(inp.fileno())
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(src, tmp)
        try:
            os.link(tmp, dest)  # fails if dest exists: never overwrite silently
        except FileExistsError:
            if _is_source_itself(src, dest):
                return "already there (it is the source itself)", None
            if os.path.islink(dest):  # a link to some other file is not our copy
                raise FileExistsError(f"{dest} is a link to another file; not overwritten") \
                    from None
            if _same_content(tmp, dest):  # a rerun after an interruption (or a hard link)
                if move:
                    _check_unchanged(src, copied)
                    return "moved (was already present)", copied
                return "already present", None
            raise FileExistsError(f"{dest} exists with other content; not overwritten") \
                from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if move:
        _check_unchanged(src, copied)
        return "moved", copied
    return "copied", None


def _check_unchanged(src: str, copied: os.stat_result) -> None:
    """Refuse to remove src if another file took its name, or it changed, while it was
    copied."""
    now = os.stat(src)
    if ((now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns)
            != (copied.st_dev, copied.st_ino, copied.st_size, copied.st_mtime_ns)):
        raise FileExistsError(f"{src} changed while it was copied; the copy is made, the "
                              "source kept")


class NotMovable(OSError):
    """A source --move could not remove: nothing is copied, and a resumed run leaves it."""


def _check_removable(src: str) -> None:
    folder = os.path.dirname(os.path.abspath(src))
    if os.statvfs(folder).f_flag & os.ST_RDONLY or not os.access(folder, os.W_OK):
        raise NotMovable(f"{src} cannot be removed (its folder is read-only); nothing copied")


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_source_itself(src: str, dest: str | Path) -> bool:
    """dest is src's own entry (a link back to it, or the same folder mounted twice), so
    removing src would remove dest. A hard link is another entry: it keeps the data."""
    return (os.path.realpath(src) == os.path.realpath(dest)
            or (os.path.basename(src) == os.path.basename(dest)
                and _same_file(os.path.dirname(os.path.abspath(src)),
                               os.path.dirname(os.path.abspath(dest)))))


MOVED = (" (moved)", " (moved (was already present))")  # how copied_to ends for a move
COPY_FAILED = "copy failed: "  # in a row's error: a resumed run copies it again


def _finish_moves(rows: Sequence[dict[str, str]], inputs: set[str],
                  targets: Sequence[str]) -> tuple[int, int]:
    """Remove the sources an interrupted run had recorded as moved, but not removed yet:
    only inputs of this run, whose recorded copy is a separate file in a target folder
    and holds the same content. Returns how many were removed and how many could not
    be (they fail the run, as they failed the one that recorded them). `inputs`: the
    run's files, each as `_where` spells it."""
    finished = unfinished = 0
    for row in rows:
        path, copied_to = row["path"], row.get("copied_to") or ""
        end = next((e for e in MOVED if copied_to.endswith(e)), None)
        if end is None or _where(path) not in inputs or not os.path.isfile(path):
            continue
        dest = copied_to[:-len(end)]
        try:
            complete = (os.path.isfile(dest) and not os.path.islink(dest)
                        and not _is_source_itself(path, dest) and _is_inside(dest, targets)
                        and _same_content(path, dest))
        except OSError as exc:  # a source or copy that cannot be read: checked next time
            unfinished += 1
            log.warning("%s: recorded as moved to %s, which cannot be checked: %s", path,
                        dest, exc.strerror or exc)
            continue
        if complete:
            try:
                os.unlink(path)
                finished += 1
            except OSError as exc:
                unfinished += 1
                log.warning("%s: recorded as moved to %s, but not removed: %s", path, dest,
                            exc.strerror or exc)
        else:
            unfinished += 1
            log.warning("%s: recorded as moved to %s, which is missing, elsewhere or "
                        "differs; kept", path, dest)
    return finished, unfinished


def _not_copyable(path: str) -> str | None:
    """Why `path` is no regular file a target folder can receive (None: it is one)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no file there (gone, or a link that leads nowhere)"
    except OSError as exc:  # a folder on the way that cannot be searched, a link loop
        return f"cannot be reached: {exc.strerror or exc}"
    return None if stat.S_ISREG(mode) else "not a regular file"


def _same_threshold(manifest_path: str, rows: Sequence[dict[str, str]], threshold: float
                    ) -> None:
    """A resumed manifest keeps one threshold, or its decisions would not add up."""
    earlier = set()
    for r in rows:
        try:
            earlier |= {float(r["threshold"])} if r.get("threshold") else set()
        except ValueError:
            raise click.UsageError(f"{manifest_path}: the row of {r.get('path')!r} has the "
                                   f"threshold {r['threshold']!r}, not a number; fix it "
                                   "or write a new manifest") from None
    if earlier - {threshold}:
        raise click.UsageError(
            f"{manifest_path} was written with --threshold "
            f"{', '.join(f'{t:g}' for t in sorted(earlier))}; resume with the same "
            "threshold, or write a new manifest")


def _same_folder(manifest_path: str, rows: Sequence[dict[str, str]],
                 files: Sequence[str], inputs: set[str]) -> None:
    """Refuse to resume a manifest written from another working folder: its relative
    paths would name none of the inputs here, and every input would be done twice.
    The sign: none of its rows names a file that is here, and an input here ends with
    what a row names (less any leading "..")."""
    # (rows of moved inputs say nothing: their files are gone, from anywhere)
    relative = {r["path"] for r in rows if r.get("path") and not os.path.isabs(r["path"])
                and not any(m in (r.get("copied_to") or "") for m in MOVED)}
    if (not relative or any(_where(p) in inputs for p in relative)
            or any(os.path.lexists(p) for p in relative)):
        return
    by_name: dict[str, list[str]] = {}
    for f in files:
        by_name.setdefault(os.path.basename(f), []).append(os.path.abspath(f))
    for p in sorted(relative):
        parts = [x for x in os.path.normpath(p).split(os.sep) if x not in (os.pardir, "")]
        tail = os.sep + os.path.join(*parts) if parts else ""
        match = next((f for f in by_name.get(os.path.basename(p), ())
                      if tail and f.endswith(tail)), None)
        if match is not None:
            base = match[:-len(tail)] or os.sep
            where = (f"resume from {base!r}" if not p.startswith(os.pardir) else
                     f"resume from the folder inside {base!r} that it was written in")
            raise click.UsageError(
                f"{manifest_path} was written from another working folder: its row "
                f"{p!r} names no file here, and the input {match!r} ends so; {where}")


def _failed_before(rows: Sequence[dict[str, str]], inputs: set[str]) -> int:
    """Inputs of this run (`_where` of each) whose rows from an earlier run say they
    failed: they still count for the exit code."""
    return len({w for r in rows if r.get("error") and r.get("path")
                and (w := _where(r["path"])) in inputs})


def _is_inside(path: str, folders: Sequence[str]) -> bool:
    """Whether path's folder is one of `folders` or below one, by real path or, for a
    folder mounted twice (a bind mount), by device and inode."""
    where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if any(os.path.commonpath([where, f]) == f for f in folders):
        return True
    ids = {i for i in map(_folder_id, folders) if i is not None}
    while ids:  # up to the root
        if _folder_id(where) in ids:
            return True
        where, child = os.path.dirname(where), where
        if where == child:
            break
    return False


@functools.lru_cache(maxsize=4096)
def _folder_id(folder: str) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _same_content(a: str | Path, b: str | Path) -> bool:
    from fiqa_gate.assets import sha256_file

    return os.path.getsize(a) == os.path.getsize(b) and sha256_file(a) == sha256_file(b)


@cli.command(name="filter")
@click.argument("paths", nargs=-1, required=True)
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Accept faces whose calibrated score is at least this.")
@click.option("-o", "--manifest", "output", default="-", show_default=True,
              help="Manifest CSV of every input ('-' for stdout).")
@click.option("--accepted-dir", type=click.Path(file_okay=False),
              help="Copy accepted files here, each at its path below the PATH it was "
                   "found under (two PATHS holding one relative path share its place: "
                   "the second is an error row, never written over the first).")
@click.option("--rejected-dir", type=click.Path(file_okay=False),
              help="Copy rejected and failed files here (failed regular files: a pipe, "
                   "device or dangling link is left where it is, and its row says so).")
@click.option("--move", is_flag=True,
              help="Remove each source after its copy is complete and synced.")
@click.option("--resume", is_flag=True, help="Append to the manifest, skipping files in it.")
@pipeline_options
def filter_(paths: tuple[str, ...], threshold: float, output: str, accepted_dir: str | None,
            rejected_dir: str | None, move: bool, resume: bool, aligned: bool, scorer: str,
            model: str | None, detector: str, recognizer: str, calibration: str | None
            ) -> None:
    """Decide accept/reject for every image under PATHS (its main face decides).

    Inputs are only read, never changed or deleted (unless --move with a target dir).
    """
    from fiqa_gate.defects import likely
    from fiqa_gate.manifest import open_manifest
    from fiqa_gate.pipeline import primary_face

    if move and not (accepted_dir or rejected_dir):
        raise click.UsageError("--move needs --accepted-dir and/or --rejected-dir")
    pipe = Pipeline(aligned, scorer, model, detector, recognizer, calibration)
    gate = pipe.gate(threshold, "filter")
    failures = Failures()
    # target folders inside an input folder hold this command's own copies: never inputs
    targets = [os.path.realpath(d) for d in (accepted_dir, rejected_dir) if d]
    for p in paths:
        if any(os.path.commonpath([os.path.realpath(p), t]) == t or _same_file(p, t)
               for t in targets):  # (one folder under two names: a bind mount)
            raise click.UsageError(f"{p} is inside a target folder; copy to a folder "
                                   "outside (or inside) the input instead")
    files = _listed(paths, (f for f in iter_files(paths) if not _is_inside(f, targets)),
                    output)
    # --move takes only what lies in the folders given, resolved (and files given by name):
    # a folder linked in from beside them is only read, as every input is without --move
    given = [os.path.realpath(p) for p in paths if os.path.isdir(p)]
    counts = {"accepted": 0, "rejected": 0, "error": 0}
    not_copied = not_removed = unfinished = not_moved = 0
    # a resumed run copies again what could not be copied (a full disk, since freed)
    inputs = {_where(f) for f in files}
    with open_manifest(output, FILTER_COLUMNS, resume=resume,
                       check=lambda rows: (_same_threshold(output, rows, threshold),
                                           _same_folder(output, rows, files, inputs)),
                       # only this run's inputs: another input's row stays as it is
                       redo=lambda row: (COPY_FAILED in (row.get("error") or "")
                                         and _where(row["path"]) in inputs)) as manifest:
        failed_before = _failed_before(manifest.done_rows, inputs)
        failures.count += failed_before
        if move:
            finished, unfinished = _finish_moves(manifest.done_rows, inputs, targets)
            failures.count += unfinished
            if finished:
                log.info("finished %d moves an earlier run had recorded", finished)
        todo = _not_done(files, manifest.done)
        named: list[tuple[str, ...]] = []  # the defects of each face this run rejected
        for path in _progress(todo, "filter"):
            row: dict = {"path": path, "threshold": threshold}
            try:
                faces = pipe.faces(path)
                decision = gate.decide_one(primary_face(faces))
                row.update(score=f"{decision.score:.6f}", raw_score=f"{decision.raw_score:.6f}",
                           decision="accept" if decision.accepted else "reject",
                           faces=len(faces), reason=decision.reason)
                named.append(decision.defects)
                if decision.failed:  # a broken policy plugin: a failure, not a decision
                    failures.count += 1
                    row.update(decision="error", error=decision.reason)
            except Exception as exc:
                failures.count += 1
                row.update(decision="error", error=_error_text(exc))
            counts[{"accept": "accepted", "reject": "rejected"}.get(row["decision"], "error")] += 1
            target = accepted_dir if row["decision"] == "accept" else rejected_dir
            copied = None
            why = _not_copyable(path) if target else None
            if why:
                not_copied += 1
                row["error"] = (row.get("error", "") + f"; not copied: {why}").lstrip("; ")
            elif target:
                try:
                    dest = Path(target) / _relpath(path, paths)
                    kept = move and path not in paths and not _is_inside(path, given)
                    how, copied = _place_copy(path, dest, move and not kept)
                    if kept:
                        not_moved += 1
                        how += ", not moved: its folder is linked in from outside the input"
                    row["copied_to"] = f"{dest} ({how})"
                except OSError as exc:  # NotMovable is no failed copy: a resume leaves it
                    failures.count += 1
                    not_copied += 1
                    what = "not moved: " if isinstance(exc, NotMovable) else COPY_FAILED
                    row["error"] = (row.get("error", "") + f"; {what}{exc}").lstrip("; ")
            manifest.write_rows([row])
            if copied is not None:  # recorded first: a rerun finishes a move cut short here
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:  # checked before; a rerun with --resume retries it
                    failures.count += 1
                    not_removed += 1
                    log.warning("%s: copied to %s, but not removed: %s", path,
                                row["copied_to"], exc.strerror or exc)
    click.echo(f"{len(files)} files: {counts['accepted']} accepted, {counts['rejected']} "
               f"rejected{likely(named)}, {counts['error']} failed (threshold {threshold})"
               + (f"; {len(files) - len(todo)} done before, in the manifest"
                  + (f" ({failed_before} of them failed)" if failed_before else "")
                  if len(todo) < len(files) else "")
               + (f"; {not_copied} not copied (see the manifest's error column)"
                  if not_copied else "")
               + (f"; {not_removed} copied but not removed (see the warnings)"
                  if not_removed else "")
               + (f"; {not_moved} copied, not moved (in folders linked in from outside the "
                  "input)" if not_moved else "")
               + (f"; {unfinished} moves recorded before not finished (see the warnings)"
                  if unfinished else ""), err=True)
    failures.exit()


# -- enroll / search --------------------------------------------------------------------
# enroll commits whole identities at least this often (each commit rewrites the index)
COMMIT_SECONDS = 5.0
COMMIT_FACES = 2000


@cli.command()
@click.argument("root")
@click.option("--index", "index_path", required=True, help="Gallery folder (created if new).")
@click.option("--gate/--no-gate", default=True, show_default=True,
              help="Gate faces before enrollment (--no-gate to compare).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True)
@click.option("--factory", default=None,
              help="FAISS index factory for a new gallery: Flat (the default), HNSW32, "
                   "IVF64,Flat ... An existing gallery keeps its own.")
@click.option("--prune", is_flag=True,
              help="Remove the faces the gallery holds from an identity folder of ROOT "
                   "whose picture is no longer among its pictures (deleted, moved away, or "
                   "now found under two identities). Without it they are kept and listed. "
                   "A picture moved or renamed that this run enrolls at its new place "
                   "(another folder, a renamed identity or ROOT) keeps its face either way.")
@click.option("--best", type=click.IntRange(min=1), default=None,
              help="Best-of-N: enroll only each identity's N best pictures by the scorer "
                   "(among those the gate accepts; an identity already holding N faces "
                   "gets no more). Only the chosen faces are embedded.")
@click.option("-o", "--manifest", "output", help="CSV of every image's outcome.")
@pipeline_options
def enroll(root: str, index_path: str, gate: bool, threshold: float, factory: str | None,
           prune: bool, best: int | None, output: str | None, aligned: bool, scorer: str,
           model: str | None, detector: str, recognizer: str, calibration: str | None
           ) -> None:
    """Enroll ROOT/<identity>/images into the gallery at --index.

    A file already in the gallery under its identity is skipped, so a run that was
    interrupted just runs again and enrolls only what is missing."""
    import numpy as np

    from fiqa_gate.defects import likely
    from fiqa_gate.gallery import Gallery
    from fiqa_gate.manifest import open_manifest
    from fiqa_gate.pipeline import primary_face

    if best is not None and not gate:
        raise click.UsageError("--best picks pictures by their quality score: it needs the "
                               "gate (drop --no-gate)")
    listed_at = time.time()  # a face another run enrolls from then on is not stale here
    # the gallery's own folder, when it lies in ROOT, is no one's pictures (a gallery
    # folder that holds ROOT keeps its files outside ROOT's identity folders)
    gallery_dir, root_dir = os.path.realpath(index_path), os.path.realpath(root)
    own_dir = [gallery_dir] if os.path.commonpath([gallery_dir, root_dir]) == root_dir \
        and gallery_dir != root_dir else []
    folders = [(identity, [f for f in _not_own(files, output or "-")
                           if not _is_inside(f, own_dir)])
               for identity, files in identity_folders(root)
               if not _is_inside(os.path.join(root, identity, ""), own_dir)]
    pipe = Pipeline(aligned, scorer if gate else None, model, detector, recognizer,
                    calibration)
    the_gate = pipe.gate(threshold, "enroll") if gate else None
    rec = registry.get_recognizer(recognizer)
    gallery = Gallery.create(index_path, rec.name, rec.dim, rec.threshold, factory)
    failures = Failures()
    columns = ENROLL_COLUMNS
    pending: list[tuple[Enrollment | None, dict]] = []  # whole identities, not yet committed
    n_in = n_skipped = n_not_best = 0
    unenrolled: list[dict] = []  # rejected by the gate or failed: said on screen too
    named: list[tuple[str, ...]] = []  # the defects of each face the gate rejected

    def commit(manifest: Manifest | None) -> int:
        """Enroll the pending faces in one transaction (all or nothing), then log their
        rows. Each transaction rewrites the whole index, so they are batched."""
        nonlocal n_moved, n_replaced, n_skipped
        items = [item for item, _ in pending if item is not None]
        try:  # a picture moved or renamed (its folder too) keeps its face
            ids = gallery.enroll(items, rec.name, gone=_surely_gone)
        except Exception as exc:  # e.g. a damaged gallery: the batch's rows say so
            ids, items = [], []
            for _, row in pending:
                if row.get("decision") == "enroll":
                    failures.count += 1
                    row.update(decision="error", error=f"not enrolled: {_error_text(exc)}")
        id_by_source = {it.source: fid for it, fid in zip(items, ids, strict=True)}
        for _, row in pending:
            if row.get("decision") in ("reject", "error"):
                unenrolled.append(row)
            face_id = id_by_source.get(_where(row["path"]))
            if face_id in gallery.moved:
                old_identity, old_source = gallery.moved[face_id]
                moved_from.add((old_identity, old_source))
                row.update(decision="moved", reason=f"moved from {old_source}" + (
                    f" ({old_identity})" if old_identity != row["identity"] else ""))
            if face_id in gallery.existing:  # another run enrolled it since this one looked
                row.update(decision="skip", reason="already enrolled (by another run, "
                           "meanwhile)")
            if face_id in gallery.replaced:
                row.update(decision="replaced", reason="the file changed since it was "
                           f"enrolled: its face was embedded again ({row.get('reason', '')})"
                           .replace(" ()", ""))
            if face_id is not None:
                row["face_id"] = face_id
                if face_id not in gallery.existing:  # the other run announced it
                    registry.emit("face_enrolled", identity=row["identity"],
                                  face_id=str(face_id))
            if manifest:
                manifest.write_rows([row])
        pending.clear()
        n_moved += len(gallery.moved)
        n_replaced += len(gallery.replaced)
        n_skipped += len(gallery.existing)
        return len(ids) - len(gallery.moved) - len(gallery.replaced) - len(gallery.existing)

    stale: list[tuple[str, str]] = []  # enrolled from an identity's folder, not there now
    moved_from: set[tuple[str, str]] = set()  # faces that followed their picture
    # faces whose file changed since and whose new picture was not enrolled in their place
    outdated: list[tuple[str, str]] = []
    group_pictures: list[str] = []  # a group photo in a person's folder: whose face is it?
    n_moved = n_replaced = 0
    last_commit = time.monotonic()
    with open_manifest(output, columns) if output else contextlib.nullcontext() as manifest:
        for identity, files in _progress(folders, "enroll"):
            known = gallery.fingerprints(identity)
            enrolled = set(known)
            gone_here = _stale(identity, root, files, gallery.sources(identity, listed_at))
            stale += gone_here
            # with --best: (raw score, its row in pending, face, calibrated score, print)
            ranked: list[tuple[float, int, Face, float, str | None]] = []
            changed: dict[str, dict] = {}  # enrolled sources whose file changed: their rows
            for path in files:
                row = {"path": path, "identity": identity}
                item = None
                where = _where(path)
                # read before the picture: a change meanwhile is found by the next run
                fingerprint = None if known.get(where, "") is None else _fingerprint(path)
                if where in enrolled:
                    if fingerprint is None or fingerprint == known[where]:
                        row.update(decision="skip", reason="already enrolled")
                        n_skipped += 1
                        pending.append((None, row))
                        continue
                    changed[where] = row  # embedded again, or its old face is outdated
                try:
                    faces = pipe.faces(path)
                    face = primary_face(faces)
                    row["faces"] = len(faces)
                    if len(faces) > 1:
                        group_pictures.append(path)
                    if the_gate is not None:
                        decision = the_gate.decide_one(face)
                        row.update(score=f"{decision.score:.6f}", reason=decision.reason)
                        if decision.failed:  # a broken policy plugin
                            failures.count += 1
                            row.update(decision="error", error=decision.reason)
                            pending.append((None, row))
                            continue
                        if not decision.accepted:
                            row["decision"] = "reject"
                            named.append(decision.defects)
                            pending.append((None, row))
                            continue
                    if best is not None:  # embedded below if among the identity's best
                        ranked.append((decision.raw_score, len(pending), face,
                                       decision.score, fingerprint))
                        row["decision"] = "enroll"
                        pending.append((None, row))
                        continue
                    item = _enrollment(rec, identity, face, path,
                                       decision.score if the_gate is not None else None,
                                       fingerprint)
                    row["decision"] = "enroll"
                except Exception as exc:
                    failures.count += 1
                    row.update(decision="error", error=_error_text(exc))
                pending.append((item, row))
            ranked.sort(key=lambda r: -r[0])
            # a face holds a place unless its picture is surely gone (deleted, renamed,
            # moved away) or this run prunes it (a copy under two identities, ...)
            listed_now = {_where(p) for p in files}
            pruned_here = {source for _, source in gone_here} if prune else set()
            # a changed file's old face stays unless this run prunes it, so it holds its
            # place, and the file's new picture takes that place, not another
            held = [s for s in enrolled if (s not in changed or not prune) and (
                s in listed_now or (s not in pruned_here and not _surely_gone(s)))] \
                if ranked else []
            chosen: list[np.ndarray] = []
            taken = 0  # places the chosen pictures take beside those held
            for raw, at, face, quality, fingerprint in ranked:
                row = pending[at][1]
                where = _where(row["path"])
                own_place = where in changed and where in held
                twin = next((s for s in held if s != where and s in listed_now
                             and _same_bytes(s, row["path"])), None)
                if twin or any(np.array_equal(face.crop, c) for c in chosen):
                    n_not_best += 1  # a copy of a picture that has its place takes none
                    row.update(decision="skip", reason=f"a copy of {twin}, enrolled"
                               if twin else "a copy of a picture chosen above")
                    continue
                if not own_place and taken >= max(0, (best or 0) - len(held)):
                    n_not_best += 1
                    row.update(decision="skip", reason=(
                        f"not among {identity}'s {best} best (raw score {raw:.6f})"
                        + (f"; {len(held)} enrolled before" if held else "")))
                    continue
                try:
                    pending[at] = (_enrollment(rec, identity, face, row["path"], quality,
                                               fingerprint), row)
                except Exception as exc:  # the next best takes its place
                    failures.count += 1
                    row.update(decision="error", error=_error_text(exc))
                    continue
                chosen.append(face.crop)
                taken += not own_place
            outdated += [(identity, where) for where, row in changed.items()
                         if row.get("decision") != "enroll"]
            # A kill loses the identities since the last commit; the rerun redoes them.
            if (sum(item is not None for item, _ in pending) >= COMMIT_FACES
                    or time.monotonic() - last_commit >= COMMIT_SECONDS):
                n_in += commit(manifest)
                last_commit = time.monotonic()
        n_in += commit(manifest)
        stale = [pair for pair in stale if pair not in moved_from]
        # a rerun enrolls what is new; it removes what was enrolled only when asked
        n_removed = gallery.remove_sources(stale + outdated, before=listed_at) if prune \
            else 0
        if manifest:
            manifest.write_rows([{"path": s, "identity": identity,
                                  "decision": "removed" if prune else "stale",
                                  "reason": "not among its identity folder's pictures now "
                                            "(deleted, moved, or a copy under two identities)"}
                                 for identity, s in stale] + [
                {"path": s, "identity": identity, "decision": "removed" if prune else "stale",
                 "reason": "the file changed since it was enrolled and its new picture was "
                           "not enrolled in its place (its row above says why)"}
                for identity, s in outdated])
    if group_pictures:
        log.warning("%d pictures hold more than one face; each stands for its main face "
                    "(the largest of those detected surely; the manifest's `faces` column "
                    "counts them): %s", len(group_pictures), ", ".join(group_pictures[:3])
                    + (", ..." if len(group_pictures) > 3 else ""))
    here = {identity for identity, _ in folders}
    elsewhere = [name for name in gallery.identities() if name not in here]
    if elsewhere:  # deleted people stay until asked: ROOT may be one of several
        log.warning("%d identities in the gallery have no folder in %s (%s); the gallery "
                    "keeps them (fiqa-gate forget NAME --index %s removes one)",
                    len(elsewhere), root, ", ".join(elsewhere[:5])
                    + (", ..." if len(elsewhere) > 5 else ""), index_path)
    if outdated:
        log.warning("%d enrolled faces come from files that changed since and whose new "
                    "pictures were not enrolled (rejected, failed or not among the best); %s: "
                    "%s", len(outdated), "removed (--prune)" if prune else "the gallery keeps "
                    "the old faces (--prune removes them)",
                    "; ".join(s for _, s in outdated[:3]) + ("; ..." if len(outdated) > 3
                                                              else ""))
    if stale:
        listed = [f"{identity}: {s}" for identity, s in stale]
        log.warning("%d faces the gallery holds are not among their identity folder's "
                    "pictures in %s now (deleted, moved, or a copy under two identities); "
                    "%s: %s", len(stale), root,
                    "removed (--prune)" if prune else "the gallery keeps them (--prune "
                    "removes them)", "; ".join(listed[:3]) + ("; ..." if len(stale) > 3
                                                              else ""))
    skipped = f", {n_skipped} already there" if n_skipped else ""
    skipped += f", {n_not_best} not among the {best} best" if n_not_best else ""
    removed = f", {n_removed} removed" if n_removed else ""
    moved = f", {n_moved} moved (their faces kept)" if n_moved else ""
    moved += f", {n_replaced} embedded again (their files changed)" if n_replaced else ""
    n_rejected = sum(r["decision"] == "reject" for r in unenrolled)
    not_in = (f", {n_rejected} rejected by the gate{likely(named)}, "
              f"{len(unenrolled) - n_rejected} failed" if unenrolled else "")
    click.echo(f"enrolled {n_in} faces of {len(folders)} identities into {index_path}"
               f"{skipped}{moved}{removed}{not_in} ({len(gallery)} faces in the gallery)",
               err=True)
    if unenrolled:
        shown = " | ".join(f"{r['path']}: {r.get('error') or r.get('reason')}"
                           for r in unenrolled[:3])  # a reason holds "; " itself
        click.echo(f"not enrolled: {shown}" + (" | ..." if len(unenrolled) > 3 else "")
                   + ("" if output else " (-o FILE lists every file with its reason)"),
                   err=True)
    gallery.close()
    failures.exit()


def _enrollment(rec: Recognizer, identity: str, face: Face, path: str,
                score: float | None, fingerprint: str | None) -> Enrollment:
    """The face's embedding, checked alone (a bad one fails this face, not its batch)."""
    from fiqa_gate.gallery import Enrollment, unit_rows

    embedding = rec.embed(face.crop[None])[0]
    unit_rows(embedding[None], f"{rec.name}'s embedding")
    return Enrollment(identity, embedding, _where(path), score, fingerprint)


def _fingerprint(path: str) -> str | None:
    """The SHA-256 of a file's bytes: a picture replaced under the same name (a swap of
    two misfiled pictures, a name reused for someone else) is enrolled again. None when
    the file cannot be read (its row says why when the picture is loaded)."""
    from fiqa_gate.assets import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def _stale(identity: str, root: str, files: Sequence[str], enrolled: set[str]) -> list[
        tuple[str, str]]:
    """The faces enrolled from `identity`'s own folder (resolved: a linked identity folder
    lives outside ROOT, a hidden one inside it is another ROOT's) whose picture is not
    listed now and surely gone: no such file, or a file the listing left out (a copy
    under two identities). A picture that cannot be looked at (below a folder that cannot
    be listed or entered) is not stale, and nothing is in an identity folder that holds
    no file at all (a drive not mounted, a sync half done)."""
    own = _where(os.path.join(root, identity, ""))
    candidates = sorted(s for s in enrolled - {_where(p) for p in files} if s.startswith(own))
    if not candidates:
        return []
    # a file at any depth (folders left by a sync, or an unlistable one, are no sign)
    if not any(names for _, _, names in os.walk(own)):
        log.warning("%s: the identity folder holds no file now (or cannot be listed); its "
                    "%d enrolled faces are not taken as stale", identity, len(enrolled))
        return []
    return [(identity, s) for s in candidates if _gone(s) or (
        _gone(s) is False and _listed_down_to(own, os.path.dirname(s)))]


def _listed_down_to(top: str, folder: str) -> bool:
    """Whether every folder from `top` down to `folder` can be listed, so that a file
    there which the listing left out was left out on purpose (a copy under two
    identities), not missed (a folder that can be entered but not listed)."""
    while True:
        try:
            os.listdir(folder)
        except OSError:
            return False
        if os.path.commonpath([folder, top.rstrip(os.sep) or os.sep]) == folder:
            return True
        parent = os.path.dirname(folder)
        if parent == folder:
            return True
        folder = parent


def _same_bytes(a: str, b: str) -> bool:
    import filecmp

    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _gone(path: str) -> bool | None:
    """Whether `path` surely does not exist (True) or surely does (False); None where it
    cannot be looked at (a folder above it without read or search permission, an I/O
    error)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return None
    return False


def _surely_gone(path: str) -> bool:
    return _gone(path) is True


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--index", "index_path", required=True, help="Gallery folder.")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--gate/--no-gate", default=False, show_default=True,
              help="Gate probes (stage 'probe') before searching.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="With --gate: the quality a probe needs to be searched. (Whether a hit "
                   "matches is decided by the gallery's own recognizer threshold.)")
@click.option("-o", "--output", default="-", show_default=True)
@pipeline_options
def search(paths: tuple[str, ...], index_path: str, top_k: int, gate: bool, threshold: float,
           output: str, aligned: bool, scorer: str, model: str | None, detector: str,
           recognizer: str, calibration: str | None) -> None:
    """Search the gallery for the faces in PATHS; CSV rows of ranked hits."""
    import numpy as np

    from fiqa_gate.gallery import Gallery
    from fiqa_gate.manifest import open_manifest

    given = click.get_current_context().get_parameter_source("threshold")
    if not gate and given is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--threshold is the probe gate's quality threshold: it needs "
                               "--gate (a hit's match is decided by the gallery's own "
                               "recognizer threshold)")
    gallery = Gallery.open(index_path)
    rec = registry.get_recognizer(recognizer)
    gallery.check_recognizer(rec.name)  # before any face is detected
    if not len(gallery):  # every probe would get no row at all
        gallery.close()
        raise GalleryError(f"{index_path}: the gallery holds no faces; enroll some first "
                           f"(fiqa-gate enroll DIR --index {index_path})")
    files = _listed(paths, iter_files(paths), output)  # the results file is not a probe
    pipe = Pipeline(aligned, scorer if gate else None, model, detector, recognizer,
                    calibration)
    the_gate = pipe.gate(threshold, "probe") if gate else None
    failures = Failures()
    columns = SEARCH_COLUMNS
    with open_manifest(output, columns) as out:
        for path in files:
            try:
                faces = pipe.faces(path)
                if the_gate is not None:
                    decisions = the_gate.decide(faces)
                    rejected = [(f, d) for f, d in zip(faces, decisions, strict=True)
                                if not d.accepted]
                    # a probe not searched is an error row, so it sets the exit code too
                    failures.count += bool(rejected)
                    out.write_rows([{"path": path, "face": f.index,
                                     "error": f"probe rejected by the gate: {d.reason}"}
                                    for f, d in rejected])
                    faces = [f for f, d in zip(faces, decisions, strict=True) if d.accepted]
                if not faces:
                    continue
                hits = gallery.search(rec.embed(np.stack([f.crop for f in faces])), rec.name,
                                      k=top_k)
            except Exception as exc:
                failures.count += 1
                out.write_rows([{"path": path, "error": _error_text(exc)}])
                continue
            for face, face_hits in zip(faces, hits, strict=True):
                out.write_rows([{"path": path, "face": face.index, "rank": r + 1,
                                 "identity": h.identity, "similarity": f"{h.similarity:.4f}",
                                 "match": int(h.match), "source": h.source}
                                for r, h in enumerate(face_hits)])
    failures.exit()


@cli.command()
@click.argument("identities", nargs=-1, required=True)
@click.option("--index", "index_path", required=True, help="Gallery folder.")
def forget(identities: tuple[str, ...], index_path: str) -> None:
    """Remove every face of IDENTITIES from the gallery at --index (an erasure request,
    a person who left). Their embeddings are overwritten in the gallery's files, not only
    unlisted. Nothing else changes; a name the gallery does not hold is an error."""
    import unicodedata

    from fiqa_gate.gallery import Gallery

    gallery = Gallery.open(index_path)
    try:
        known = gallery.identities()
        # "José" typed composed names a folder written decomposed (macOS): one person
        spelt = {unicodedata.normalize("NFC", name): name for name in known}
        names = [n if n in known else spelt.get(unicodedata.normalize("NFC", n), n)
                 for n in identities]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise GalleryError(f"{index_path}: no faces of {', '.join(map(repr, unknown))} in "
                               f"the gallery; nothing was removed (it holds "
                               f"{len(known)} identities)")
        removed = gallery.remove_identities(names)
        erased = gallery.erase_log()
    finally:
        gallery.close()
    click.echo(f"removed {removed} faces of {len(set(names))} identities from "
               f"{index_path}", err=True)
    if not erased:
        log.warning("%s: another process has the gallery open; the removed embeddings stay "
                    "in its write-ahead log (meta.sqlite-wal) until that process closes it "
                    "(run forget again then to erase them)", index_path)


# -- plugins ------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def plugins(as_json: bool) -> None:
    """List loaded plugins, their hooks, and what each registers."""
    pm = registry.plugin_manager()
    reg = registry.registry()
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda x: str(x[0])):
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        provides = {kind: sorted(n for n, e in getattr(reg, kind).items() if e.plugin == name)
                    for kind in ("detectors", "recognizers", "scorers")}
        provides["commands"] = PLUGIN_COMMANDS.get(name, [])
        out.append({"name": name, "module": getattr(plugin, "__name__", str(plugin)),
                    "hooks": hooks, **{k: v for k, v in provides.items() if v}})
    failed = registry.failed_plugins()
    if as_json:
        click.echo(json.dumps({"plugins": out, "failed": failed}, indent=2))
        return
    for p in out:
        extras = "; ".join(f"{k}: {', '.join(v)}" for k, v in p.items()
                           if k in ("detectors", "recognizers", "scorers", "commands"))
        click.echo(f"{p['name']} ({p['module']})\n  hooks: {', '.join(p['hooks'])}"
                   + (f"\n  {extras}" if extras else ""))
    for name, why in failed.items():
        click.echo(f"{name}: FAILED to load: {why}")


def _add_plugin_commands(group: click.Group) -> None:
    try:
        from fiqa_gate.evaluation.cli import bench, calibrate, demo, evaluate
    except ImportError as exc:  # evaluation is part of the core; say why it is missing
        log.warning("evaluation commands unavailable: %s", exc)
    else:
        for command in (evaluate, bench, demo, calibrate):
            group.add_command(command)
    try:
        from fiqa_gate_training.cli import train
    except ImportError:
        pass
    else:
        group.add_command(train)
    for impl in registry.plugin_manager().hook.register_commands.get_hookimpls():
        before = dict(group.commands)
        try:
            impl.function(cli=group)
        except Exception as exc:
            log.warning("plugin %s failed to add commands: %s", impl.plugin_name, exc)
        for name, command in before.items():  # a plugin adds commands, never replaces one
            if group.commands.get(name) is not command:
                log.warning("plugin %s tried to replace the command %r; kept the original",
                            impl.plugin_name, name)
                group.commands[name] = command
        PLUGIN_COMMANDS[impl.plugin_name] = sorted(set(group.commands) - set(before))


PLUGIN_COMMANDS: dict[str, list[str]] = {}  # plugin name -> the commands it added


class _Messages:
    """stderr, whose write errors (a full disk, a closed pipe) are dropped."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":  # click would write bytes there, past the guard
            raise AttributeError(name)
        return getattr(self._stream, name)


def main(argv: Iterable[str] | None = None) -> None:
    if sys.stderr is None:  # started with `2>&-`: the work still runs, its messages go
        null = os.open(os.devnull, os.O_WRONLY)
        if null != 2:  # onto fd 2 itself, not onto whichever fd (the manifest's) is next
            os.dup2(null, 2)
            os.close(null)
        sys.stderr = open(2, "w", closefd=False)
    # Messages, not results: a full or broken stderr must not fail the work.
    sys.stderr = _Messages(sys.stderr)
    # File names are bytes on POSIX; undecodable ones must reach CSV on stdout unchanged.
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    args = list(sys.argv[1:] if argv is None else argv)
    # Plugins register commands before parsing, so --no-plugins must act first. It is an
    # option of the group, before the command: later, it is a file name (`-o --no-plugins`).
    group_options = itertools.takewhile(lambda a: a.startswith("-") and a != "--", args)
    if "--no-plugins" in group_options:
        os.environ["FIQA_GATE_NO_PLUGINS"] = "1"
        registry.reset()
    try:
        _add_plugin_commands(cli)
        cli.main(args=args, prog_name="fiqa-gate")
    except KeyboardInterrupt:  # before a command runs (e.g. while plugins import)
        _interrupted()
    except OSError as exc:  # e.g. --help on a full stdout
        _os_error(exc)
    except Exception as exc:
        if caused_by_interrupt(exc):
            _interrupted()
        raise
