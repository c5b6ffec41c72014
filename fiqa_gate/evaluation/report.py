"""Evaluation report: JSON (everything), Markdown (the tables), PNGs (EDC, score histograms)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fiqa_gate.errors import FiqaGateError
from fiqa_gate.evaluation.metrics import EDCResult

REPORT_TITLE = "# fiqa-gate evaluation: "  # how a report.md this command wrote begins


def intervals_withheld(boot: dict[str, Any]) -> bool:
    """More than half the bootstrap resamples had no normalised pAUC: those left (the few
    that happen to hold errors) are no fair sample, so no interval is given."""
    return 2 * boot.get("undefined", 0) > boot.get("resamples", 0)


def fmt(v: Any, digits: int = 3) -> str:
    """A figure for a table: fixed digits, `n/a` for missing or non-finite values."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
        else f"{v:.{digits}f}"


def _points(v: Any) -> str:
    """A rank-1 rate or difference in signed points, for a table."""
    return "n/a" if v is None else f"{100 * v:+.1f}"


def interval(bounds: list[float | None] | tuple[float | None, ...], sep: str = "-",
             value: Callable[[Any], str] = fmt) -> str:
    """A confidence interval for a table, or `n/a` when none was computed (--bootstrap 0);
    `sep` " to " for signed values, `value` how each bound is written."""
    lo, hi = value(bounds[0]), value(bounds[1])
    return "n/a" if "n/a" in (lo, hi) else f"{lo}{sep}{hi}"


def edc_rows(results: dict[str, EDCResult], ci: dict[str, tuple[float, float]]
             ) -> list[dict[str, Any]]:
    rows = []
    for name, r in sorted(results.items(), key=lambda kv: np.nan_to_num(kv[1].pauc_norm[0.2],
                                                                        nan=9.0)):
        lo, hi = ci.get(name, (math.nan, math.nan))
        rows.append({"scorer": name, "pauc_norm_20": r.pauc_norm[0.2],
                     "ci95_20": [lo, hi], "pauc_norm_30": r.pauc_norm[0.3],
                     "fnmr_at_10": r.fnmr_at[0.1], "fnmr_at_20": r.fnmr_at[0.2]})
    return rows


def verification_summary(results: dict[str, EDCResult],
                         ci: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Threshold, e0, oracle and the per-scorer rows: the same for every scorer's EDC."""
    r = next(iter(results.values()))
    return {"tau": r.tau, "fmr_target": r.fmr_target, "e0": r.e0, "n_mated": r.n_mated,
            "n_nonmated": r.n_nonmated, "warning": r.warning,
            "oracle_pauc_norm_20": r.oracle_pauc_norm[0.2],
            "oracle_pauc_norm_30": r.oracle_pauc_norm[0.3],
            "scorers": edc_rows(results, ci)}


def edc_top(results: dict[str, EDCResult], right: float = 0.5) -> float:
    """The EDC plot's upper FNMR: room above e0, and above every curve up to `right` (a
    scorer worse than random rises above e0; the plot had cut it off at 1.25 e0)."""
    shown = [r.curve.fnmr[r.curve.x <= right] for r in results.values()]
    highest = max((float(np.max(f)) for f in shown if f.size), default=0.0)
    return max(next(iter(results.values())).e0 * 1.25, highest * 1.05, 1e-3)


def plot_edc(results: dict[str, EDCResult], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    any_r = next(iter(results.values()))
    for name, r in sorted(results.items()):
        style = {"random": dict(color="grey", ls="--")}.get(name, {})
        ax.step(r.curve.x, r.curve.fnmr, where="post",
                label=f"{name} ({fmt(r.pauc_norm[0.2])})", lw=2 if name == "student" else 1.2,
                **style)
    oc = any_r.oracle_curve
    ax.plot(oc.x, oc.fnmr, color="black", ls=":", label="oracle")
    ax.axhline(any_r.e0, color="grey", lw=0.6)
    ax.axvline(0.2, color="grey", lw=0.6, ls="--")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, edc_top(results))
    ax.set_xlabel("fraction of mated comparisons discarded (lowest quality first)")
    ax.set_ylabel(f"FNMR at fixed tau = {any_r.tau:.3f} (FMR {any_r.fmr_target:g})")
    ax.set_title(title)
    ax.legend(title="scorer (normalised pAUC 20 %)", fontsize=8)
    fig.tight_layout()
    replace_file(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)
    return path


def histogram_bins(values: np.ndarray, n: int = 30) -> tuple[np.ndarray | int, bool]:
    """Bin edges for a score histogram, and whether they are logarithmic: positive scores
    spanning more than two decades (sharpness) would otherwise pile into the first bin."""
    if not values.size:
        return 10, False
    lo, hi = float(values.min()), float(values.max())
    if lo > 0 and hi / lo > 100:
        return np.geomspace(lo, hi * (1 + 1e-9), n), True
    return np.linspace(lo, hi + 1e-9, n), False


def plot_scores(qualities: dict[str, np.ndarray], matched: np.ndarray, path: Path,
                title: str) -> Path:
    """Per scorer: histograms of its score for faces that match their references and not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in qualities if n != "random"]  # random's histogram says nothing
    if not names:
        names = list(qualities)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=110,
                             squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        q = qualities[name]
        ok = np.isfinite(q)
        bins, log = histogram_bins(q[ok])
        ax.hist(q[ok & matched], bins=bins, alpha=0.6, label="matched", color="tab:green")
        ax.hist(q[ok & ~matched], bins=bins, alpha=0.6, label="not matched", color="tab:red")
        if log:
            ax.set_xscale("log")
        ax.set_title(f"{name}{' (log scale)' * log}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    replace_file(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)
    return path


def _sampled(v: dict[str, Any]) -> str:
    limit = v.get("pair_limit")
    if limit and limit in (v["n_mated"], v["n_nonmated"]):
        return f" (past {limit} of a kind, a seeded uniform sample of that many)"
    return ""


def _bootstrap_lines(boot: dict[str, Any] | None) -> list[str]:
    if not boot or not boot["resamples"]:
        return []
    undefined = boot.get("undefined", 0)
    return [f"95 % CI: {boot['resamples']} bootstrap resamples of the {boot['unit']}s, each "
            "drawn with every comparison of its faces (comparisons sharing a face are not "
            "independent), the threshold recomputed on each"
            + (f"; {undefined} left out, in which every mated pair matches with nothing "
               "discarded (no normalised pAUC)" if undefined else "")
            + ("; with more than half left out, those left (the few that happen to hold "
               "errors) are no fair sample, so no interval is given"
               if intervals_withheld(boot) else "") + ".", ""]


def gain_interval(entry: dict[str, Any]) -> str:
    """The 95 % interval of a rank-1 gain in points ("+8.0 to +19.1"), or "" without one."""
    ci = interval(entry.get("rank1_gain_ci95", (None, None)), " to ", _points)
    return "" if ci == "n/a" else ci


def _gain(entry: dict[str, Any], ref: dict[str, Any]) -> str:
    ci = gain_interval(entry)
    return f"{100 * (entry['rank1'] - ref['rank1']):+.1f}{f' ({ci})' if ci else ''}"


def _fpir_reached(ident: dict[str, Any]) -> str:
    """What the non-mated searches allowed, where it is not the FPIR asked for."""
    met = ident.get("fpir_measured")
    if met is None:
        return "; no non-mated probes: the recognizer's threshold"
    n = ident["nonmated_probes"]
    return "" if met == ident["fpir"] else (
        f"; {round(met * n)} of the {n} non-mated searches pass it: FPIR {met:.3g}")


def _identification_lines(ident: dict[str, Any] | None) -> list[str]:
    if not ident:
        return []
    u, boot = ident["ungated"], ident.get("bootstrap")
    lines = ["", "## Identification with the FAISS gallery", "",
             f"{ident['identities_enrolled']} identities enrolled from "
             f"{ident['candidates']} candidates; {ident['mated_probes']} mated and "
             f"{ident['nonmated_probes']} non-mated probes; FNIR at FPIR "
             f"{ident['fpir']:g} (threshold {ident['fpir_threshold']:.3f} fixed on the "
             f"all-candidates run{_fpir_reached(ident)})."]
    if boot:
        lines.append(f"95 % CI: {boot['resamples']} bootstrap resamples of the mated probes' "
                     "source pictures, each enrolled gallery as chosen; a gain is judged on "
                     "the same resamples as its reference.")
    lines += ["", "Best-of-N (one enrollment image per identity, picked by the scorer):", "",
              "| picked by | rank-1 | 95 % CI | gain vs random (points, 95 % CI) | FNIR |",
              "|---|---|---|---|---|"]
    rand = ident["best_of_n"]["random"]
    for name, r in sorted(ident["best_of_n"].items(), key=lambda kv: -kv[1]["rank1"]):
        lines.append(f"| {name} | {fmt(r['rank1'])} | {interval(r.get('rank1_ci95', (None,) * 2))}"
                     f" | {_gain(r, rand)} | {fmt(r['fnir'])} |")
    lines += _against_table(ident.get("best_of_n_paired"), "picks")
    lines += ["", f"Gated enrollment (all candidates with score >= {ident['gate_threshold']}) "
                  f"versus all {u['enrolled']} candidates (rank-1 {fmt(u['rank1'])}, FNIR "
                  f"{fmt(u['fnir'])}):", "",
              "| gate | enrolled | rank-1 | 95 % CI | gain (points, 95 % CI) | FNIR |",
              "|---|---|---|---|---|---|"]
    for name, r in ident["gated"].items():
        lines.append(f"| {name} | {r['enrolled']} | {fmt(r['rank1'])} | "
                     f"{interval(r.get('rank1_ci95', (None,) * 2))} | {_gain(r, u)} | "
                     f"{fmt(r['fnir'])} |")
    return lines


def _share(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.0f} %"


# what a paired table compares, and how its differences are written
_AGAINST: dict[str, tuple[str, Callable[[Any], str]]] = {
    "pauc": ("Paired comparison: {first}'s normalised pAUC at 20 % minus each other scorer's "
             "(negative: {first} is better), on the same bootstrap resamples; an interval "
             "that holds 0 is a tie.", fmt),
    "picks": ("Best-of-N, paired: rank-1 of {first}'s picks minus each other scorer's "
              "(points; positive: {first} picked better), on the same resamples; an interval "
              "that holds 0 is a tie.", _points),
}


def _against_table(paired: dict[str, Any] | None, kind: str) -> list[str]:
    """The first scorer against each other scorer on shared resamples: difference, its
    interval, and the shares of resamples it is ahead and behind in (n/a in reports
    written before "behind" was recorded)."""
    if not paired:
        return []
    intro, value = _AGAINST[kind]
    first, rows = paired["first"], paired["against"]
    columns = ["difference", "95 % CI", f"{first} ahead in", "behind in"]
    lines = ["", intro.format(first=first), "",
             f"| {first} against | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for d in rows:
        cells = [d["scorer"], value(d["difference"]), interval(d["ci95"], " to ", value),
                 _share(d["ahead"]), _share(d.get("behind"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [f"{REPORT_TITLE}{report['dataset']}", "",
             f"Recognizer **{report['recognizer']}**; {report['faces']} faces, "
             f"{report['verification']['n_mated']} mated / "
             f"{report['verification']['n_nonmated']} non-mated comparisons"
             f"{_sampled(report['verification'])}; tau "
             f"{report['verification']['tau']:.4f} at FMR {report['verification']['fmr_target']:g}"
             f"; FNMR with nothing discarded {report['verification']['e0']:.4f}. "
             f"Machine: {report['machine']}.", ""]
    listed = report.get("pairs")
    if listed:
        why = {"same_image": "of an image with itself", "repeated": "listed again",
               "mated_and_non_mated": "listed both as mated and as non-mated",
               "image_skipped": "with an image left out (below)"}
        out = [f"{n} {why[k]}" for k, n in listed.get("left_out", {}).items() if n]
        lines += [f"Pairs list: {listed['listed']} listed, {listed['compared']} compared"
                  + (f"; left out: {', '.join(out)}" if out else "") + ".", ""]
    if report.get("skipped_images"):
        n = len(report["skipped_images"])
        lines += [f"{n} image{'s' * (n != 1)} left out (unreadable, no face, or "
                  "a face too small; report.json lists each with its reason).", ""]
    deg = report.get("degradation")
    if deg:
        lines += [f"Degradations ({deg.get('protocol', 'training')} kinds, seed {deg['seed']}, "
                  f"{deg['variants_per_image']} per image besides the clean face): "
                  f"{', '.join(deg.get('kinds', []))}.", ""]
    if report["verification"].get("warning"):
        lines += [f"> warning: {report['verification']['warning']}", ""]
    lines += ["## Verification: EDC at a fixed threshold (normalised pAUC, lower is better)", "",
              f"Oracle: {fmt(report['verification']['oracle_pauc_norm_20'])} at 20 %, "
              f"{fmt(report['verification']['oracle_pauc_norm_30'])} at 30 %. ![EDC](edc.png)",
              "", *_bootstrap_lines(report["verification"].get("bootstrap")),
              "| scorer | pAUC 20 % | 95 % CI | pAUC 30 % | FNMR @10 % | FNMR @20 % |",
              "|---|---|---|---|---|---|"]
    for r in report["verification"]["scorers"]:
        lines.append(f"| {r['scorer']} | {fmt(r['pauc_norm_20'])} | {interval(r['ci95_20'])} |"
                     f" {fmt(r['pauc_norm_30'])} | {fmt(r['fnmr_at_10'])} |"
                     f" {fmt(r['fnmr_at_20'])} |")
    lines += _against_table(report["verification"].get("paired"), "pauc")
    if report.get("erc"):
        target = report.get("erc_fmr_target", 1e-3)
        lines += ["", f"ERC, threshold recomputed at FMR {target:g} on the pairs kept (CR-FIQA "
                  "/ MagFace style), area under FNMR vs discard 0-95 %:", "",
                  "| scorer | area |", "|---|---|"]
        lines += [f"| {k} | {fmt(v, 4)} |" for k, v in report["erc"].items()]
        if any(fmt(v) == "n/a" for v in report["erc"].values()):
            lines += ["", "n/a: at some step of the discard no matching or no impostor pair "
                      "is left."]
    lines += _identification_lines(report.get("identification"))
    groups = report.get("by_degradation")
    if groups:
        names = list(groups[0]["srcc"])
        lines += ["", "## By degradation", "",
                  "Faces grouped by the damage they carry, the group's mean similarity to "
                  "mated references, and inside each group the SRCC of each scorer with a "
                  "face's own mean mated similarity (does it rank that damage right?):", "",
                  "| group | faces | mated similarity | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for g in groups:
            lines.append(f"| {g['group']} | {g['faces']} | {fmt(g['mated_similarity'])} | "
                         + " | ".join(fmt(g["srcc"][n]) for n in names) + " |")
    lines += ["", "Score distributions: ![scores](scores.png)", "",
              f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_strict(report), indent=2, allow_nan=False)  # JSON has no NaN
    replace_file(out / "report.json", lambda fh: fh.write(text.encode()))
    replace_file(out / "report.md", lambda fh: fh.write(markdown(report).encode()))


def replace_file(path: Path, write: Callable[[BinaryIO], object],
                 named: bool = False) -> None:
    """Write `path` whole or not at all (`assets.atomic_write`), or say why not. Only a
    file the user `named` (bench -o FILE) is written as `>` would, through a link or to
    a stream; the files of a report folder replace whatever is there (a link planted in a
    shared folder must not aim a run at another file)."""
    from fiqa_gate.assets import atomic_write

    try:
        atomic_write(path, write, follow_links=named)
    except OSError as exc:  # a full disk, a folder gone read-only
        raise FiqaGateError(f"cannot write {path}: {exc.strerror or exc}") from None


def _strict(o: Any) -> Any:
    """The report as strict JSON values: NumPy to Python, NaN and infinities (a figure
    that could not be computed, e.g. every interval with --bootstrap 0) to null."""
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, np.ndarray)):
        return [_strict(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def print_table(report: dict[str, Any]) -> None:
    """A rich table where the terminal is a TTY, plain aligned text otherwise."""
    import sys

    rows = report["verification"]["scorers"]
    header = ["scorer", "pAUC 20 %", "95 % CI", "pAUC 30 %", "FNMR@20 %"]
    body = [[r["scorer"], fmt(r["pauc_norm_20"]),
             interval(r["ci95_20"]), fmt(r["pauc_norm_30"]),
             fmt(r["fnmr_at_20"])] for r in rows]
    if sys.stdout is None:  # closed: the report files hold the tables
        return
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            table = Table(title=f"EDC with {report['recognizer']} (lower is better)")
            for h in header:
                table.add_column(h)
            for b in body:
                table.add_row(*b)
            Console().print(table)
            return
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    for line in [header, *body]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)))
