"""`fiqa-gate train ...`: the recipe from the command line (torch is imported only here,
when a training command actually runs, so the runtime CLI stays torch-free)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import click
from fiqa_gate_training.recipe import STAGES  # torch-free at import

from fiqa_gate.errors import FiqaGateError


def _need_torch() -> None:
    missing = [m for m in ("torch", "timm", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise FiqaGateError(  # exit 2, as a missing [dlib] extra (1 means failed inputs)
            f"training needs {', '.join(missing)}: pip install 'fiqa-gate[train]'")


class _RunLog(logging.FileHandler):
    """train.log. When it cannot be written (a full disk) that is said once and stderr
    carries on: each line had printed a 33-line "--- Logging error ---" block."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"warning: {self.baseFilename} cannot be written "
                                 f"({sys.exc_info()[1]}); the log goes on on stderr only\n")


_ours: list[tuple[logging.Logger, logging.Handler]] = []  # what _log_to added last


def _log_to(out: Path) -> None:
    """The run's messages to OUT/train.log and stderr; the runtime's warnings during the
    run (a MOS list's repeated rows, files left out) to train.log too (the command line's
    own handler prints them). A second run in one process replaces the first's handlers."""
    for logger, handler in _ours:
        logger.removeHandler(handler)
        handler.close()
    _ours.clear()
    out.mkdir(parents=True, exist_ok=True)
    training = logging.getLogger("fiqa_gate.training")
    training.setLevel(logging.INFO)
    training.propagate = False  # one line per event, not one per handler up the tree
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    run_log, stderr = _RunLog(out / "train.log"), logging.StreamHandler(sys.stderr)
    run_log.addFilter(lambda r: r.name.startswith("fiqa_gate.training")
                      or r.levelno >= logging.WARNING)  # the runtime's warnings only
    for logger, handler in ((training, run_log), (training, stderr),
                            (logging.getLogger("fiqa_gate"), run_log)):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
        _ours.append((logger, handler))


@click.group()
def train() -> None:
    """Train, self-train, distil, calibrate and export a student (needs [train])."""


@train.command("run")
@click.argument("config")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default runs/CONFIG). Re-running resumes.")
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGES),
              help="Run only these stages (default: all in order, except ablation and "
                   "input_size). A named report is made again.")
@click.option("--install/--no-install", default=False,
              help="Copy the exported student into fiqa_gate/models/ (the shipped default).")
def run_command(config: str, out: Path | None, stages: tuple[str, ...], install: bool) -> None:
    """Run the recipe CONFIG (a built-in name: cpu, paper, smoke; or a JSON file)."""
    _need_torch()
    from fiqa_gate_training import recipe

    try:
        cfg = recipe.load_config(config)
    except (FileNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    out = out or Path("runs") / cfg["name"]
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} is a file; a run needs a folder")
    try:
        _log_to(out)
    except OSError as exc:  # a parent that is a file, read-only media: before any work
        raise click.UsageError(f"--out {out}: cannot write a run there: "
                               f"{exc.strerror or exc}") from None
    chosen = recipe.DEFAULT_STAGES if not stages else tuple(
        s for s in recipe.STAGES if s in stages)
    try:
        run = recipe.run_recipe(cfg, out, chosen, remake_report="report" in stages,
                                asked=bool(stages))
    except recipe.RecipeError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(json.dumps(run.times, indent=2), err=True)
    if install:
        install_student(out / "export")


def install_student(export: Path) -> None:
    """Copy student.{onnx,json,md} into the package: it becomes the default scorer."""
    from fiqa_gate import models_dir
    from fiqa_gate.assets import file_mode, temp_file
    from fiqa_gate.student import OnnxStudentScorer

    if not (export / "student.onnx").is_file():
        raise click.UsageError(f"not installed: {export} holds no exported student; run the "
                               "export and report stages first")
    OnnxStudentScorer(export / "student.onnx")  # refuse to install what would not load
    names = ("student.onnx", "student.json", "student.md", "student.safetensors",
             "baselines.json")
    missing = [n for n in names if not (export / n).is_file()]
    if missing:  # a shipped student always comes with its figures (the report stage's card)
        raise click.UsageError(
            f"not installed: {export} lacks {', '.join(missing)}; the shipped student needs "
            "all of them (the report stage writes student.md; smoke skips it)")
    dest = models_dir()
    staged: list[tuple[Path, Path]] = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        # Every file is written beside its place first, and only then are they renamed in
        # together: a full disk leaves the installed student whole, not half replaced.
        for name in names:
            fd, tmp = temp_file(dest, ".tmp")
            staged.append((Path(tmp), dest / name))
            with os.fdopen(fd, "wb") as fh:
                fh.write((export / name).read_bytes())
                fh.flush()
                os.fsync(fh.fileno())
                old = dest / name
                os.fchmod(fh.fileno(), file_mode(old.stat() if old.is_file() else None))
        for tmp, final in staged:
            os.replace(tmp, final)
    except OSError as exc:
        raise FiqaGateError(f"not installed: cannot write {dest}: {exc.strerror or exc}; "
                            "the installed student is unchanged") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    click.echo(f"installed {export / 'student.onnx'} -> {dest}", err=True)


@train.command("configs")
def configs_command() -> None:
    """List the built-in configs."""
    for path in sorted((Path(__file__).parent / "configs").glob("*.json")):
        click.echo(f"{path.stem:8s} {json.loads(path.read_text()).get('description', '')}")
