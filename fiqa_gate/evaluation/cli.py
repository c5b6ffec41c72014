"""`fiqa-gate evaluate`, `fiqa-gate bench`, `fiqa-gate demo`: the gain and the cost."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import numpy as np

from fiqa_gate import registry
from fiqa_gate.errors import FiqaGateError
from fiqa_gate.evaluation.timing import machine, versions

if TYPE_CHECKING:
    from fiqa_gate.calibration import Calibration
    from fiqa_gate.datasets import Samples

log = logging.getLogger("fiqa_gate")

_F = TypeVar("_F", bound=Callable[..., Any])

DEFAULT_SCORERS = ("student", "sharpness", "detector-confidence", "embedding-norm", "random")


def _available_scorers(names: Sequence[str]) -> list[str]:
    known = set(registry.registry().scorers) | {"random"}
    missing = [n for n in names if n not in known]
    if missing:
        raise click.UsageError(f"unknown scorer(s) {', '.join(missing)}; known: "
                               f"{', '.join(sorted(known))}")
    return list(names)


def _warn_skipped(skipped: dict[str, str]) -> None:
    n = len(skipped)
    if n:
        shown = "; ".join(f"{p}: {why}" for p, why in list(skipped.items())[:3])
        more = f" (and {n - 3} more)" if n > 3 else ""
        click.echo(f"warning: {n} file{'s' * (n != 1)} left out: {shown}{more}", err=True)


def _judge(sim: np.ndarray, mated: np.ndarray, a: np.ndarray, b: np.ndarray,
           raw: dict[str, np.ndarray], units: Sequence[str], bootstrap: int, out: Path,
           title: str) -> dict[str, Any]:
    """EDC with bootstrap intervals, ERC, and both plots: what every kind of input gets.

    `units` names each face's source picture: the bootstrap draws pictures, each with
    every comparison of its faces, since comparisons that share a face are not
    independent (drawing single comparisons gave intervals several times too narrow)."""
    from fiqa_gate.evaluation import report as rep
    from fiqa_gate.evaluation.metrics import (
        bootstrap_pauc_norms,
        erc,
        pair_quality,
        paired_differences,
        percentile_interval,
    )
    from fiqa_gate.evaluation.protocol import edc_by_scorer, mated_mean

    results = edc_by_scorer(sim, mated, a, b, raw)
    ci: dict[str, tuple[float, float]] = {}
    paired: dict[str, Any] = {}
    undefined = 0
    if bootstrap:
        unit = np.asarray(units)  # labels as they are: the bootstrap numbers them itself
        resampled = bootstrap_pauc_norms(
            sim, mated, {n: pair_quality(q[a], q[b]) for n, q in raw.items()}, n_boot=bootstrap,
            units=(unit[a], unit[b]))
        # a resample whose mated pairs all match has no pAUC to normalise (same for all)
        undefined = int((~np.isfinite(next(iter(resampled.values())))).sum())
        if rep.intervals_withheld({"undefined": undefined, "resamples": bootstrap}):
            resampled = {n: np.full_like(v, np.nan) for n, v in resampled.items()}
        ci = {n: percentile_interval(v) for n, v in resampled.items()}
        # the first scorer named (the student by default) against each of the others
        first = next(iter(raw))
        point = {n: r.pauc_norm[0.2] for n, r in results.items()}
        paired = {"first": first,
                  "against": [d.to_dict() for d in paired_differences(resampled, point, first)]}
    # A face "matches" when it matches most of its references at the recognizer threshold;
    # a face with no mated comparison (a pairs list's impostor-only face) is neither.
    any_result = next(iter(results.values()))  # one threshold for every scorer
    tau, target = any_result.tau, any_result.fmr_target
    share, references = mated_mean(sim >= tau, mated, a, b, len(units))
    has = references > 0
    out.mkdir(parents=True, exist_ok=True)
    rep.plot_edc(results, out / "edc.png", f"EDC, {title}")
    rep.plot_scores({n: q[has] for n, q in raw.items()}, share[has] >= 0.5,
                    out / "scores.png", f"Raw scores, {title}")
    return {"verification": {**rep.verification_summary(results, ci), "paired": paired,
                             "bootstrap": {"resamples": bootstrap, "unit": "source picture",
                                           "undefined": undefined},
                             "curves": {n: r.to_dict() for n, r in results.items()}},
            # at the EDC's target: with too few impostors for 1e-3 it had stayed at 1e-3
            "erc": {n: erc(sim, mated, pair_quality(q[a], q[b]), fmr_target=target).area
                    for n, q in raw.items()},
            "erc_fmr_target": target}


def run_evaluation(data: str | None, recognizer_name: str, scorers: Sequence[str],
                   out: Path, variants: int, seed: int, bootstrap: int,
                   gate_threshold: float, options: dict[str, dict[str, Any]], command: str,
                   degradations: str = "training",
                   calibrations: dict[str, Calibration] | None = None) -> dict[str, Any]:
    from fiqa_gate import degradations as kinds_of
    from fiqa_gate.assets import cache_dir
    from fiqa_gate.datasets import SEEDING
    from fiqa_gate.evaluation import report as rep
    from fiqa_gate.evaluation.identification import identification
    from fiqa_gate.evaluation.protocol import (
        MAX_PAIRS,
        by_degradation,
        in_chunks,
        load_test_set,
        similarities,
        verification_pairs,
    )

    detector = registry.get_detector()
    recognizer = registry.get_recognizer(recognizer_name)
    held_out = degradations == "held-out"
    kinds = kinds_of.HELD_OUT_KINDS if held_out else kinds_of.KINDS
    cache = None if data is not None else (
        cache_dir() / "eval"
        / f"orl_test_k{SEEDING}_v{variants}_s{seed}{'_held-out' if held_out else ''}.npz")
    left_out: list[tuple[str, str]] = []
    samples = load_test_set(detector, root=data, variants=variants, seed=seed, cache=cache,
                            progress="faces", kinds=kinds, skipped=left_out)
    skipped = dict(left_out)
    _warn_skipped(skipped)
    people = len(set(samples.identity))
    clean = int(np.sum(samples.clean))
    made = (f" ({clean} from the pictures, {len(samples) - clean} their seeded degraded "
            "copies; --variants 0 for the pictures alone)" if clean < len(samples) else "")
    click.echo(f"{len(samples)} faces of {people} identities{made}; embedding with "
               f"{recognizer_name}", err=True)
    emb, norms = in_chunks(recognizer.embed_with_norms, samples.crops, "embedding")
    a, b, mated = verification_pairs(samples.identity, samples.source, samples.clean)
    if not mated.any() or mated.all():
        pictures = len(set(samples.source))
        raise FiqaGateError(
            "evaluation needs at least two identities with two images each in which a face "
            f"is found; a face was found in {pictures} image{'s' * (pictures != 1)} of "
            f"{people} identities"
            + (f" ({len(skipped)} left out, above)" if skipped else ""))
    sim = similarities(emb, a, b)
    raw, calibrated = _qualities(samples, scorers, recognizer_name, options, norms,
                                 calibrations)
    ident = identification(samples, emb, recognizer_name, recognizer.threshold, raw,
                           calibrated, gate_threshold=gate_threshold, bootstrap=bootstrap)
    title = (f"{'ORL s31-s40' if data is None else data} ({recognizer_name}"
             f"{', held-out degradations' if held_out else ''})")
    judged = _judge(sim, mated, a, b, raw, samples.source, bootstrap, out, title)
    judged["verification"]["pair_limit"] = MAX_PAIRS
    report = {
        "dataset": "ORL s31-s40 (built-in test split)" if data is None else str(data),
        "recognizer": recognizer_name, "faces": len(samples), "identities": people,
        "machine": machine(), "versions": versions(),
        "degradation": {"variants_per_image": variants, "seed": seed,
                        "protocol": degradations, "kinds": list(kinds)},
        "command": command, "models": _models(list(raw), options), "skipped_images": skipped,
        **judged,
        "identification": ident,
        "by_degradation": by_degradation(samples.records, sim, mated, a, b, raw),
    }
    rep.write(report, out)
    return report


def _pairs_evaluation(pairs: str, recognizer_name: str, scorers: Sequence[str], out: Path,
                      options: dict[str, dict[str, Any]], command: str,
                      image_root: str | None = None,
                      bootstrap: int = 200) -> dict[str, Any]:
    """A pairs list (CSV path_a,path_b,mated, or LFW's pairs.txt); one face per image."""
    from tqdm import tqdm

    from fiqa_gate.datasets import Samples, read_pairs
    from fiqa_gate.evaluation import report as rep
    from fiqa_gate.evaluation.protocol import in_chunks, similarities
    from fiqa_gate.pipeline import faces_from_file, primary_face

    # One face per file, however the list spells its path (links, hard links included).
    # An image compared with itself matches whatever its quality, and a pair listed twice
    # counts twice: both would bend the EDC, so they are left out, with a word.
    listed_rows = read_pairs(pairs, image_root)
    name = _one_name_per_file({p for a, b, _ in listed_rows for p in (a, b)})
    rows = [(name[a], name[b], m) for a, b, m in listed_rows]
    selfs = repeats = 0
    labelled: dict[tuple[str, str], dict[bool, tuple[str, str, bool]]] = {}
    for a, b, m in rows:
        if a == b:
            selfs += 1
            continue
        listings = labelled.setdefault((min(a, b), max(a, b)), {})
        repeats += m in listings
        listings[m] = (a, b, m)  # kept in the order its last listing gives
    if selfs or repeats:
        log.warning("%s: %d pairs of an image with itself and %d repeated pairs left out",
                    pairs, selfs, repeats)
    # A pair listed as mated and as non-mated has no label to trust.
    both = sorted(k for k, v in labelled.items() if len(v) == 2)
    if both:
        log.warning("%s: %d pairs listed both as mated and as non-mated left out (%s)", pairs,
                    len(both), ", ".join(" & ".join(k) for k in both[:2]) +
                    (", ..." if len(both) > 2 else ""))
    unique = [row for v in labelled.values() if len(v) == 1 for row in v.values()]
    if not unique:
        raise FiqaGateError(f"{pairs}: no pair of two different images left to compare")
    listed, rows = len(rows), unique
    paths = sorted({p for r in rows for p in r[:2]})
    recognizer = registry.get_recognizer(recognizer_name)  # a wrong name fails before detection
    detector = registry.get_detector()
    faces, failed = {}, {}
    for p in tqdm(paths, desc="images", unit="image", leave=False):
        try:
            faces[p] = primary_face(faces_from_file(p, detector))
        except FiqaGateError as exc:
            failed[p] = str(exc).removeprefix(f"{p}: ")  # the path is the key already
    _warn_skipped(failed)
    kept = [r for r in rows if r[0] in faces and r[1] in faces]
    if not kept:
        missing = sum("file not found" in why for why in failed.values())
        hint = (f"; {missing} of its files were not found: relative paths are taken from "
                "--data when given, else from the working folder" if missing else "")
        raise FiqaGateError(f"{pairs}: no pair with a face found in both images{hint}")
    order = sorted(faces)
    pos = {p: i for i, p in enumerate(order)}
    samples = Samples(np.stack([faces[p].crop for p in order]), [None] * len(order), order,
                      [[] for _ in order],
                      np.asarray([faces[p].det_score or 0.0 for p in order]))
    a = np.asarray([pos[r[0]] for r in kept])
    b = np.asarray([pos[r[1]] for r in kept])
    mated = np.asarray([r[2] for r in kept], dtype=bool)
    if not mated.any() or mated.all():
        raise FiqaGateError(f"{pairs}: need both mated and non-mated pairs with faces found")
    emb, norms = in_chunks(recognizer.embed_with_norms, samples.crops, "embedding")
    sim = similarities(emb, a, b)
    raw, _ = _qualities(samples, scorers, recognizer_name, options, norms)
    report = {"dataset": str(pairs), "recognizer": recognizer_name, "faces": len(order),
              "machine": machine(), "versions": versions(), "command": command,
              "models": _models(list(raw), options),
              "skipped_images": failed,
              "pairs": {"listed": listed, "compared": len(kept),
                        "left_out": {"same_image": selfs, "repeated": repeats,
                                     "mated_and_non_mated": 2 * len(both),  # listings
                                     "image_skipped": len(rows) - len(kept)}},
              **_judge(sim, mated, a, b, raw, order, bootstrap, out,
                       f"{pairs} ({recognizer_name})")}
    rep.write(report, out)
    return report


def _one_name_per_file(paths: set[str]) -> dict[str, str]:
    """Each listed path mapped to one name for its picture: the real path, and for hard
    links of one file (same device and inode) or byte-identical copies the first of their
    real paths. Only files that share a size are read."""
    from fiqa_gate.assets import same_size_digests

    name, first, sizes = {}, {}, {}
    for p in sorted(paths):
        real = os.path.realpath(p)
        try:
            st = os.stat(real)
        except OSError:  # missing or unreadable: fails later, with its reason
            name[p] = real
            continue
        name[p] = first.setdefault((st.st_dev, st.st_ino), real)
        if stat.S_ISREG(st.st_mode):
            sizes[name[p]] = st.st_size
    by_digest: dict[str, str] = {}
    copy_of = {f: by_digest.setdefault(d, f)
               for f, d in sorted(same_size_digests(sizes).items())}
    return {p: copy_of.get(n, n) for p, n in name.items()}


def _qualities(samples: Samples, scorers: Sequence[str], recognizer_name: str,
               options: dict[str, dict[str, Any]], norms: np.ndarray,
               calibrations: dict[str, Calibration] | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every scorer's qualities; a user's plugin that fails is left out, not the run."""
    from fiqa_gate.evaluation.protocol import qualities

    raw, calibrated = qualities(samples, scorers, recognizer_name, options, progress=True,
                                norms=norms, tolerant=True, calibrations=calibrations)
    if not raw:
        raise FiqaGateError("no scorer left to compare: each one failed (see the warnings)")
    return raw, calibrated


def _models(scorers: Sequence[str], options: dict[str, dict[str, Any]]
            ) -> dict[str, dict[str, str]]:
    """Which model files the scorers ran (path and digest), beside the command line: a
    --model or --teacher file, else the shipped student."""
    from fiqa_gate.assets import sha256_file
    from fiqa_gate.student import SHIPPED_STUDENT

    files = {name: Path(o["model"]) for name, o in options.items()
             if o.get("model") and name in scorers}
    if "student" in scorers and "student" not in files:
        files["student"] = SHIPPED_STUDENT
    return {name: {"path": str(path.resolve()), "sha256": sha256_file(path)}
            for name, path in files.items()}


def _evaluation_options(fn: _F) -> _F:
    for option in reversed([
        click.option("--recognizer", default=registry.DEFAULT_RECOGNIZER, show_default=True,
                     help="Recognizer plugin whose errors the scores must predict."),
        click.option("--scorer", "scorers", multiple=True,
                     help=f"Scorer plugin to compare (repeat); default: "
                          f"{', '.join(DEFAULT_SCORERS)}."),
        click.option("--model", type=click.Path(exists=True, dir_okay=False),
                     help="Student ONNX file instead of the shipped one."),
        click.option("--teacher", type=click.Path(exists=True, dir_okay=False),
                     help="A training run's RUN/export/teacher.onnx, scored as its "
                          "pseudo-labels were (add --scorer teacher to compare it)."),
        click.option("--variants", type=click.IntRange(min=0), default=3, show_default=True,
                     help="Seeded degradations per image (besides the clean face)."),
        click.option("--seed", default=314159, show_default=True,
                     help="Degradation seed of the test protocol."),
        click.option("--degradations", type=click.Choice(["training", "held-out"]),
                     default="training", show_default=True,
                     help="Draw from the kinds the recipes train on, or from kinds no "
                          "training run saw (pixelation, haze, shadow, colour cast, salt "
                          "and pepper, posterisation, glare)."),
        click.option("--bootstrap", type=click.IntRange(min=0), default=200,
                     show_default=True,
                     help="Bootstrap resamples for confidence intervals (0: none)."),
        click.option("--gate-threshold", type=click.FloatRange(0.0, 1.0), default=0.5,
                     show_default=True,
                     help="Calibrated score a candidate needs for gated enrollment."),
        click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
                     help="A `fiqa-gate calibrate` file: its scorers gate enrollment on its "
                          "maps for --recognizer instead of the shipped ones (SFace's, dlib's)."),
    ]):
        fn = option(fn)
    return fn


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False),
              help="Identity-labelled folder: one sub-folder per identity, its images "
                   "at any depth below it (ROOT/<identity>/**/*.jpg, .png, ...; files "
                   "directly in ROOT are ignored). Default: ORL s31-s40. With --pairs, "
                   "the folder the pairs' images are in.")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False),
              help="Comparisons to judge instead of the identity protocol: a CSV "
                   "path_a,path_b,mated (1/0 or true/false; relative paths from --data, "
                   "else from the working folder), or LFW's pairs.txt with --data LFW_ROOT.")
@click.option("-o", "--out", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("fiqa-gate-report"), show_default=True,
              help="Report folder; its report.md, report.json, edc.png and scores.png are "
                   "replaced (a report.md or report.json fiqa-gate did not write is "
                   "refused).")
@_evaluation_options
def evaluate(data: str | None, pairs: str | None, out: Path, recognizer: str,
             scorers: Sequence[str], model: str | None, teacher: str | None, variants: int,
             seed: int, degradations: str, bootstrap: int, gate_threshold: float,
             calibration: str | None) -> None:
    """How much each scorer improves recognition: EDC, ERC, identification, plots."""
    scorers = _available_scorers(scorers or DEFAULT_SCORERS)
    if "teacher" in scorers and not teacher:  # before minutes of detection and embedding
        raise click.UsageError("--scorer teacher needs --teacher RUN/export/teacher.onnx")
    command = "fiqa-gate " + " ".join(sys.argv[1:])
    options = {name: {"model": path} for name, path in
               (("student", model), ("teacher", teacher)) if path}
    _check_models(options, scorers, recognizer)
    if pairs:
        ctx = click.get_current_context()
        ignored = [f"--{n.replace('_', '-')}" for n in ("variants", "seed", "degradations",
                                                          "gate_threshold", "calibration")
                   if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
        if ignored:  # a pairs list is judged as it is, without identification
            raise click.UsageError(f"{', '.join(ignored)} apply to the identity protocol, "
                                   "not to --pairs")
        _check_report_folder(out)
        report = _pairs_evaluation(pairs, recognizer, scorers, out, options, command, data,
                                   bootstrap)
    else:
        if data is not None and _inside(out, data):  # its PNGs would be read next run
            raise click.UsageError(f"the report folder {out} is inside --data {data}, where "
                                   "a next run would read its files as pictures; choose "
                                   "another")
        _check_report_folder(out)
        calibrations = None
        if calibration is not None:  # read now, not after minutes of embedding
            from fiqa_gate.calibration import load_fitted, read_fitted

            fitted = read_fitted(calibration)["scorers"]
            calibrations = {name: load_fitted(calibration, name, recognizer,
                                              options.get(name, {}).get("model"))
                            for name in scorers if name in fitted}
        report = run_evaluation(data, recognizer, scorers, out, variants, seed, bootstrap,
                                gate_threshold, options, command, degradations, calibrations)
    from fiqa_gate.evaluation.report import print_table

    print_table(report)
    for note in _report_warnings(report):
        click.echo(f"warning: {note}", err=True)
    click.echo(f"report: {out / 'report.md'} (+ report.json, edc.png, scores.png)", err=True)


def _inside(path: Path, root: str) -> bool:
    """`path` (which may not exist yet) is below identity folder ROOT or in one of its
    identity folders, links resolved (a linked identity folder lives outside ROOT; files
    directly in ROOT are no one's, so a report there is not read back)."""
    real = Path(os.path.realpath(path))
    if Path(os.path.realpath(root)) in real.parents:
        return True
    places = {real, *real.parents}
    try:
        with os.scandir(root) as entries:
            return any(e.is_dir() and Path(os.path.realpath(e.path)) in places
                       for e in entries)
    except OSError:  # ROOT's own listing says why, when the run reads it
        return False


def _check_models(options: dict[str, dict[str, Any]], scorers: Sequence[str],
                  recognizer: str) -> None:
    """Load the model files the user named before minutes of work: a plugin that fails
    later is left out with a warning, but a file named on the command line is the point
    of the run."""
    for name, opts in options.items():
        if name not in scorers:
            log.warning("--%s %s is not used: add --scorer %s", "model" if name == "student"
                        else name, opts["model"], name)
            continue
        try:
            registry.get_scorer(name, registry.ScorerContext(recognizer, opts))
        except FiqaGateError as exc:
            raise click.UsageError(str(exc)) from None


def _report_warnings(report: dict[str, Any]) -> list[str]:
    """What a reader of the table alone would miss: why figures are relaxed, n/a or empty."""
    v, notes = report["verification"], []
    if v.get("warning"):
        notes.append(v["warning"])
    if v.get("e0") == 0:
        variants = report.get("degradation", {}).get("variants_per_image")
        hint = ("; --variants 0 adds no degraded faces" if variants == 0
                else "; harder images or more --variants would give it errors to remove"
                if variants is not None else "")
        notes.append(f"every pAUC is n/a: FNMR is 0 with nothing discarded (every mated "
                     f"pair already matches at tau {v['tau']:.3f}), so discarding has no "
                     f"error to remove{hint}")
    from fiqa_gate.evaluation.report import intervals_withheld

    boot = v.get("bootstrap", {})
    if v.get("e0") != 0 and intervals_withheld(boot):
        notes.append(f"confidence intervals n/a: in {boot['undefined']} of "
                     f"{boot['resamples']} bootstrap resamples every mated pair matches with "
                     "nothing discarded, and the few left (those that happen to hold "
                     "errors) are no fair sample; harder images or more --variants give "
                     "intervals")
    ident = report.get("identification")
    if ident and ident["identities_enrolled"] < 2:
        notes.append(f"identification: {ident['identities_enrolled']} identity enrolled (70 % "
                     "of the identities are), so every search finds it and rank-1 cannot "
                     "tell the picks apart; it needs 3 or more identities")
    elif ident and not ident["mated_probes"]:
        notes.append("identification: no mated probes (an enrolled identity needs 2 or more "
                     "pictures: the first half enroll, the rest probe), so rank-1 is n/a")
    elif ident and ident.get("most_candidates") == 1:
        notes.append("identification: every enrolled identity has one candidate (the first "
                     "half of its pictures, with --variants 0 no degraded copies), so "
                     "best-of-N has nothing to choose and equals random")
    if ident and ident["nonmated_probes"] * ident["fpir"] < 5:
        notes.append(f"identification: only {ident['nonmated_probes']} non-mated searches "
                     f"(probes of the 30 % of identities not enrolled): FNIR at FPIR "
                     f"{ident['fpir']:g} rests on {int(ident['nonmated_probes'] * ident['fpir'])}"
                     " of them passing; 100 or more give it meaning")
    return notes


@click.command()
@click.option("-o", "--out", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("fiqa-gate-report"), show_default=True)
@click.option("--recognizer", default=registry.DEFAULT_RECOGNIZER, show_default=True)
def demo(out: Path, recognizer: str) -> None:
    """The main job: the gate's gain on the bundled ORL test faces, in a few minutes."""
    from fiqa_gate.evaluation import report as rep

    _check_report_folder(out)
    scorers = [s for s in DEFAULT_SCORERS if s in registry.registry().scorers or s == "random"]
    report = run_evaluation(None, recognizer, scorers, out, 3, 314159, 200, 0.5, {},
                            f"fiqa-gate demo --recognizer {recognizer}")
    rows = {r["scorer"]: r for r in report["verification"]["scorers"]}
    v = report["verification"]
    main = "student" if "student" in rows else next(iter(rows))
    best_base = min((r for n, r in rows.items() if n not in (main, "random")),
                    key=lambda r: np.nan_to_num(r["pauc_norm_20"], nan=9.0))
    ident = report["identification"]
    paired = _against(v["paired"], main, best_base["scorer"])
    picks = _against(ident.get("best_of_n_paired", {}), main, best_base["scorer"])
    ci = rep.gain_interval(ident["best_of_n"].get(main, {}))
    gain = f"; 95 % CI of the gain {ci} points" if ci else ""
    click.echo(
        f"\nORL test identities s31-s40, clean + degraded, {report['faces']} faces, "
        f"{recognizer} at FMR {v['fmr_target']:g} (tau {v['tau']:.3f}):\n"
        f"  FNMR with every face kept:           {v['e0']:.3f}\n"
        f"  FNMR after the {main} gate drops 20 %: {rows[main]['fnmr_at_20']:.3f}\n"
        f"  normalised pAUC@20 % ({main}):      {rows[main]['pauc_norm_20']:.3f} "
        f"(best baseline {best_base['scorer']}: {best_base['pauc_norm_20']:.3f}, random "
        f"{rows['random']['pauc_norm_20'] if 'random' in rows else 1.0:.3f}, "
        f"oracle {v['oracle_pauc_norm_20']:.3f})\n"
        f"{_lead(main, best_base['scorer'], paired)}"
        f"  rank-1, enrollment picked by {main}:  "
        f"{ident['best_of_n'].get(main, {}).get('rank1', float('nan')):.3f} "
        f"(random pick {ident['best_of_n']['random']['rank1']:.3f}{gain})\n"
        f"{_picks_line(main, best_base['scorer'], picks)}"
        f"plots: {out / 'edc.png'}, {out / 'scores.png'}; tables: {out / 'report.md'}")


def _against(block: dict[str, Any], first: str, other: str) -> dict[str, Any] | None:
    """`first` against `other` from a paired block, if `first` is the one it compares."""
    if block.get("first") != first:
        return None
    return next((d for d in block.get("against", []) if d["scorer"] == other), None)


def _comparison(label: str, d: dict[str, Any] | None, better_is_low: bool,
                scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """One line: is a paired difference more than bootstrap noise?"""
    if not d or None in d["ci95"]:
        return ""
    lo, hi = d["ci95"]
    gain_lo, gain_hi = (-hi, -lo) if better_is_low else (lo, hi)  # as a gain: above 0 is ahead
    verdict = ("ahead" if gain_lo > 0 else "behind" if gain_hi < 0 else
               "a tie within resampling noise")

    def f(v: float) -> str:
        return f"{scale * v:+.{digits}f}"

    return f"  {label} {f(d['difference'])}{unit} (95 % CI {f(lo)} to {f(hi)}: {verdict})\n"


def _lead(main: str, other: str, paired: dict[str, Any] | None) -> str:
    """`main`'s normalised pAUC minus `other`'s (lower is better)."""
    return _comparison(f"{main} minus {other}:       ", paired, better_is_low=True)


def _picks_line(main: str, other: str, picks: dict[str, Any] | None) -> str:
    """Rank-1 of `main`'s best-of-N picks minus `other`'s (higher is better)."""
    return _comparison(f"rank-1, {main}'s picks minus {other}'s:", picks, better_is_low=False,
                       scale=100, digits=1, unit=" points")


@click.command()
@click.option("--repeats", type=click.IntRange(min=1), default=7, show_default=True,
              help="Repeats; medians reported.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON here too.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False),
              help="Student ONNX file instead of the shipped one.")
def bench(repeats: int, output: Path | None, model: str | None) -> None:
    """Faces/s and latency of the gate, detection, embeddings, and the whole pipeline."""
    from fiqa_gate.assets import is_stream
    from fiqa_gate.evaluation.bench import run_bench
    from fiqa_gate.evaluation.report import replace_file

    if output is not None and _is_stdout(output):  # written there once, not twice
        output = None
    stream = output is not None and is_stream(output)  # a pipe, a FIFO
    if stream and not os.access(output, os.W_OK):
        raise FiqaGateError(f"cannot write to {output}")
    if output and not stream:
        target = Path(os.path.realpath(output))  # a link writes the file it names
        if output.is_symlink() and not target.parent.is_dir():
            raise FiqaGateError(f"{output} links to {target}, in no folder that exists")
        _check_writable(target.parent)
        _check_earlier(target, output, "timings", "`fiqa-gate bench` result")
    result = run_bench(repeats=repeats, model=model)
    result["models"] = _models(["student"], {"student": {"model": model}} if model else {})
    text = json.dumps(result, indent=2)
    if stream:  # stdout first: a FIFO waits for its reader, as `>` would
        click.echo(text)
    failed = None
    if output:  # else first: a stdout that fails must not cost the file its figures
        try:
            replace_file(output, lambda fh: fh.write(text.encode() + b"\n"), named=True)
        except FiqaGateError as exc:  # and a file that fails, not the figures on stdout
            failed = exc
    if not stream:
        click.echo(text)
    if failed is not None:
        raise failed


def _is_stdout(path: Path) -> bool:
    """`path` is the file this process's standard output goes to (-o /dev/stdout, or the
    file `>` redirects to)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False  # no such file, or a stdout with no descriptor (a test's runner)


def _check_earlier(target: Path, shown: Path, key: str, what: str) -> None:
    """Refuse to replace a file that is not an earlier result of this command (a JSON
    object with `key`): `-o photo.jpg` would lose it."""
    if target.is_dir():  # found before the work, not when its results are written
        raise FiqaGateError(f"{shown} is a folder; it cannot take the results")
    try:
        if not target.is_file() or target.stat().st_size == 0:
            return
        with open(target, "rb") as fh:
            earlier = json.loads(fh.read(64 << 20))
        if isinstance(earlier, dict) and key in earlier:
            return
    except (OSError, ValueError):
        pass  # unreadable or not JSON: not ours
    raise FiqaGateError(f"{shown} exists and is not an earlier {what}; it is not "
                        "overwritten: remove it or give -o another file")


CALIBRATION_SCORERS = ("student", "sharpness", "detector-confidence", "embedding-norm")


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False),
              help="Identity-labelled folder (ROOT/<identity>/**/<images>), two pictures "
                   "a person at least. Default: ORL s25-s30, the validation identities the "
                   "shipped calibration was fitted on (never the s31-s40 test split).")
@click.option("--recognizer", default=registry.DEFAULT_RECOGNIZER, show_default=True,
              help="Recognizer plugin whose matches the score is to predict.")
@click.option("--scorer", "scorers", multiple=True,
              help=f"Scorer plugin to calibrate (repeat); default: "
                   f"{', '.join(CALIBRATION_SCORERS)}.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False),
              help="Student ONNX file instead of the shipped one.")
@click.option("--variants", type=click.IntRange(min=0), default=40, show_default=True,
              help="Seeded degradations per image besides the clean face (the default "
                   "is the training recipe's, so that the faces span good to useless; each "
                   "image is embedded and scored this many times more, so a large --data "
                   "folder needs fewer).")
@click.option("--seed", default=8, show_default=True,
              help="Degradation seed (8: the recipe's validation faces).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("calibration.json"), show_default=True,
              help="Calibration file, for --calibration of score, filter, enroll, search.")
def calibrate(data: str | None, recognizer: str, scorers: Sequence[str], model: str | None,
              variants: int, seed: int, output: Path) -> None:
    """Fit each scorer's map from raw output to P(match) for a recognizer, so that a
    threshold means the same with it as the shipped SFace calibration does."""
    from fiqa_gate.assets import is_stream
    from fiqa_gate.datasets import (
        ORL_VAL,
        build_samples,
        detect_sources,
        identity_folder,
        orl_items,
    )
    from fiqa_gate.evaluation.protocol import fit_calibrations, in_chunks, qualities
    from fiqa_gate.evaluation.report import replace_file

    scorers = _available_scorers(scorers or CALIBRATION_SCORERS)
    options = {"student": {"model": model}} if model else {}
    _check_models(options, scorers, recognizer)
    if not is_stream(output):  # /dev/stdout, a pipe, a FIFO: nothing to check or replace
        target = Path(os.path.realpath(output))
        _check_writable(target.parent)
        _check_earlier(target, output, "scorers", "`fiqa-gate calibrate` result")
    rec = registry.get_recognizer(recognizer)
    detector = registry.get_detector()
    left_out: list[tuple[str, str]] = []
    items = orl_items(ORL_VAL) if data is None else identity_folder(data)
    samples = build_samples(detect_sources(items, detector, skipped=left_out), detector,
                            variants=variants, seed=seed, progress="faces")
    _warn_skipped(dict(left_out))
    emb, norms = in_chunks(rec.embed_with_norms, samples.crops, "embedding")
    raw = qualities(samples, scorers, recognizer, options, progress=True, norms=norms,
                    tolerant=True, raw_only=True)[0]
    where = "ORL s25-s30" if data is None else str(data)
    fitted = fit_calibrations(samples, emb, raw, rec, where)
    result = {"recognizer": recognizer, "data": where, "faces": len(samples),
              "variants": variants, "seed": seed, "models": _models(list(fitted), options),
              "command": "fiqa-gate " + " ".join(sys.argv[1:]), "versions": versions(),
              "scorers": {name: {"x": c.x, "y": c.y, "note": c.note}
                          for name, c in fitted.items()}}
    # a stream (/dev/stdout, a pipe) is appended to, as `>` or `>>` left it
    replace_file(output, lambda fh: fh.write(json.dumps(result, indent=1).encode() + b"\n"),
                 named=True)
    for name, c in fitted.items():
        share = float(np.mean(c(raw[name]) >= 0.5))
        click.echo(f"{name}: {len(c.x)} knots; --threshold 0.5 accepts {share:.0%} of "
                   f"these {len(samples)} faces", err=True)
    click.echo(f"calibration for {recognizer}: {output} (use it with --recognizer "
               f"{recognizer} --calibration {output})", err=True)


def _check_report_folder(folder: Path) -> None:
    """A report folder is written to only where its report files are fiqa-gate's own:
    `-o ~/notes` had replaced a report.md the user wrote."""
    from fiqa_gate.evaluation.report import REPORT_TITLE

    _check_writable(folder)
    _check_earlier(folder / "report.json", folder / "report.json", "verification",
                   "`fiqa-gate evaluate` report")
    md = folder / "report.md"
    if md.is_dir():
        raise FiqaGateError(f"{md} is a folder; it cannot take the results")
    try:
        with open(md, "rb") as fh:  # an editor may have saved it with a BOM
            ours = fh.read(len(REPORT_TITLE) + 3).removeprefix(b"\xef\xbb\xbf") \
                .startswith(REPORT_TITLE.encode())
    except FileNotFoundError:
        return
    except OSError:
        ours = False
    if not ours:
        raise FiqaGateError(f"{md} exists and is not an earlier `fiqa-gate evaluate` report; "
                            "it is not overwritten: remove it or give -o another folder")


def _check_writable(folder: Path) -> None:
    """Fail before minutes of work, not after, when the results could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise FiqaGateError(f"cannot write to {folder}: {exc.strerror or exc}") from None
