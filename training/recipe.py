"""The recipe of Sun et al. (ICCV 2025 W), stage by stage, every stage resumable.

    data       faces, degradations and recognition-derived labels   data/*.npz, labels.json
    teacher    teacher on the labelled set (MSE + PLCC)             teacher.safetensors
    pseudo_a   teacher labels unlabelled set A                      pseudo_a.npy
    enhanced   self-training: teacher again on labelled + A         enhanced.safetensors
    pseudo_b   enhanced teacher labels unlabelled set B             pseudo_b.npy
    student    distil on labelled + A + B                           student.safetensors
    calibrate  raw output -> P(match at the FMR 1e-3 threshold)     calibration.json
    export     ONNX (checked against torch) + safetensors + JSON     export/
    ablation   the paper's ablation: students from labelled; + A     student_l*.safetensors
    input_size the same student at other input sizes, equal epochs  student_px*.safetensors
               (these two only when asked for: --stage ablation --stage input_size)
    report     test-split figures for the model card                report.json, student.md

A stage whose output exists is skipped, and the training loop resumes from its last
epoch checkpoint, so an interrupted `fiqa-gate train run` just runs again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fiqa_gate_training.config import check_config

from fiqa_gate.assets import atomic_save_array, atomic_write_json, read_state_json
from fiqa_gate.datasets import Samples

if TYPE_CHECKING:
    from fiqa_gate_training.models import QualityNet

log = logging.getLogger("fiqa_gate.training")

STAGES = ("data", "teacher", "pseudo_a", "enhanced", "pseudo_b", "student", "calibrate",
          "export", "ablation", "input_size", "report")
# Run only when named (`--stage ablation`): the shipped model depends on neither, and the
# time they take (the 352 px student alone a quarter of the CPU recipe's) goes to the
# shipped student instead.
# Each with the config key that asks for it.
ON_REQUEST = {"ablation": "ablation", "input_size": "input_size_ablation"}
DEFAULT_STAGES = tuple(s for s in STAGES if s not in ON_REQUEST)
# The stages whose outputs each stage reads (the rest of the chain is theirs to need).
NEEDS = {"teacher": ("data",), "pseudo_a": ("teacher",), "enhanced": ("pseudo_a",),
         "pseudo_b": ("enhanced",), "student": ("pseudo_b",), "calibrate": ("data", "student"),
         "export": ("calibrate",), "ablation": ("pseudo_b",), "input_size": ("pseudo_b",),
         "report": ("export",)}


CONFIG_DIR = Path(__file__).parent / "configs"


class RecipeError(Exception):
    """A run that cannot go on as asked (not a bug): the message says what to do."""


def load_config(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise FileNotFoundError(f"no config {name_or_path!r} (built-in: {known})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file: {exc}") from None
    check_config(cfg, path.name)  # before any work: a typo found here, not an hour in
    cfg.setdefault("name", path.stem)
    return cfg


class Run:
    """A run directory: config, log, stage outputs, and the wall time each stage took."""

    def __init__(self, cfg: dict[str, Any], out: Path) -> None:
        self.cfg, self.out = cfg, out
        out.mkdir(parents=True, exist_ok=True)
        self.data = out / "data"
        self._samples: dict[str, Samples] = {}
        self.trunk_views: Any = None  # the teachers' cached trunk views, once a hint loads them
        self.b_views: Any = None  # set B's, when the hint asks for them (`hint.set_b`)
        saved = out / "config.json"
        if saved.exists():
            try:
                before = json.loads(saved.read_bytes())
            except ValueError:
                raise RecipeError(f"{saved} is damaged, so which config made this run is "
                                  "unknown; delete it to go on with this config, or use a new "
                                  "--out") from None
            if before != cfg:
                raise RecipeError(f"{out} holds a run of another config; use a new --out")
        else:  # not rewritten when there: a finished run resumes on a full disk
            atomic_write_json(saved, cfg)
        self.times_path = out / "stage_times.json"
        self.times: dict[str, float] = read_state_json(self.times_path) or {}

    def samples(self, name: str) -> Samples:
        """A data set of this run, read from disk once (every student stage reuses them)."""
        if name not in self._samples:
            self._samples[name] = Samples.load(self.data / f"{name}.npz")
        return self._samples[name]

    def val_embeddings(self) -> np.ndarray:
        """The labelling recognizer's embeddings of the validation faces, computed once."""
        from fiqa_gate_training.data import embeddings_file

        cache = embeddings_file(self.data, "labelled_val")
        if not cache.exists():
            from fiqa_gate.registry import get_recognizer

            recognizer = get_recognizer(self.cfg["data"]["recognizer"])
            atomic_save_array(cache, recognizer.embed(self.samples("labelled_val").crops))
        return np.load(cache)

    def labelled_sets(self) -> list[str]:
        """The labelled training sets, in the order every network sees them."""
        return ["labelled_train"] + (["mos"] if (self.data / "mos.npz").exists() else [])

    def labelled(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [self.samples(name) for name in self.labelled_sets()]
        return (np.concatenate([p.crops for p in parts]),
                np.concatenate([p.extra["label"] for p in parts]))

    def timed(self, stage: str, fn: Callable[[], Any]) -> None:
        t0 = time.time()
        fn()
        self.times[stage] = self.times.get(stage, 0.0) + time.time() - t0
        atomic_write_json(self.times_path, self.times)


def _model(spec: dict[str, Any]) -> QualityNet:
    from fiqa_gate_training.models import build_model

    return build_model(spec)


def _validator(run: Run, size: int) -> Callable[[Any], float]:
    """Minus the mean normalised pAUC (20 % and 30 % discard) of the validation EDC with
    the labelling recognizer: model selection looks at the figure the gate is judged by,
    on identities it never trained on (s25-s30), never at the test split."""
    from fiqa_gate_training.teacher import embedding_norms
    from fiqa_gate_training.train import predict

    from fiqa_gate.evaluation.metrics import edc, pair_quality
    from fiqa_gate.evaluation.protocol import similarities, verification_pairs

    val = run.samples("labelled_val")
    a, b, mated = verification_pairs(val.identity, val.source, val.clean)
    sim = similarities(run.val_embeddings(), a, b)

    def figure(q: np.ndarray) -> float:
        res = edc(sim, mated, pair_quality(q[a], q[b]))
        return float(np.mean([res.pauc_norm[0.2], res.pauc_norm[0.3]]))

    # The free baseline a student has to beat, on the same faces and figure.
    log.info("validation: %d faces; %s's embedding norm scores %.4f there (lower is better)",
             len(val.crops), run.cfg["data"]["recognizer"],
             figure(embedding_norms(run, "labelled_val")))
    return lambda model: -figure(predict(model, val.crops, size))


def views_file(run: Run, spec: dict[str, Any]) -> Path:
    """The frozen trunk's cached features, shared by every network with that trunk."""
    return run.out / f"views_{spec['backbone']}_{spec.get('freeze', 0)}.pt"


def _train(run: Run, spec: dict[str, Any], name: str, crops: np.ndarray,
           targets: np.ndarray, sets: list[str] | None = None,
           pick: np.ndarray | None = None) -> None:
    """Train and save one network. `sets` names the data sets `crops` concatenates (and
    `pick` the faces kept of them): a student with a hint finds its faces' trunk views."""
    import torch
    from fiqa_gate_training.export import save_weights
    from fiqa_gate_training.train import fit

    val = _validator(run, int(spec["input_size"])) if spec.get("select_on_val") else None
    hint = None
    if spec.get("hint"):
        views, rows = _trunk_views(run, sets or [], bool(spec["hint"].get("set_b")))
        hint = (views, rows if pick is None else rows[pick])
    torch.manual_seed(int(spec.get("seed", 0)))  # the initial weights follow the seed too
    model = fit(_model(spec), crops, targets, spec, run.out / f"{name}.ckpt", desc=name,
                val=val, views_file=views_file(run, spec), hint=hint)
    save_weights(model, run.out / f"{name}.safetensors")
    (run.out / f"{name}.ckpt").unlink(missing_ok=True)


def _trunk_views(run: Run, sets: list[str], set_b: bool = False) -> tuple[Any, np.ndarray]:
    """The teachers' cached frozen-trunk views, and the row there of every face of `sets`
    in order (-1 for a set the trunk never saw: B). With `set_b`, B's views are computed
    once (`views_..._unlabelled_b.pt`) and stacked after the teachers'. Checked on the
    first face of each part."""
    import torch
    from fiqa_gate_training.teacher import _offsets
    from fiqa_gate_training.train import (
        StackedViews,
        make_views,
        save_whole,
        split,
        views_belong_to,
    )

    spec = run.cfg["teacher"]
    path = views_file(run, spec)
    if not int(spec.get("freeze", 0)) or not path.exists():
        raise ValueError("student.hint needs the teachers' frozen-trunk features "
                         f"(teacher.freeze > 0 and {path.name} from the teacher stages)")
    if run.trunk_views is None:  # 1.4 GB in the CPU recipe: read once for every student
        run.trunk_views = torch.load(path, weights_only=True)
    views = run.trunk_views
    trunk = split(_load(run, "teacher", "teacher"), int(spec["freeze"]))[0]
    size = int(spec["input_size"])
    offsets, rows = _offsets(run), []
    b_start = len(views)
    for name in sets:
        n = len(run.samples(name))
        start = offsets.get(name)
        covered = start is not None and start + n <= len(views)
        if not covered and set_b and name == "unlabelled_b":
            start, covered = b_start, True
        rows.append(np.arange(start, start + n) if covered else np.full(n, -1))
    first = run.samples(sets[0]).crops[:1]
    if not views_belong_to(trunk, first, views, int(rows[0][0]), size):
        raise ValueError(f"{path} does not hold the trunk views of {sets[0]}")
    if set_b and "unlabelled_b" in sets:
        b_path = path.with_name(f"{path.stem}_unlabelled_b.pt")
        crops = run.samples("unlabelled_b").crops
        if run.b_views is None and b_path.exists():
            run.b_views = torch.load(b_path, weights_only=True)
        if run.b_views is None or not views_belong_to(trunk, crops, run.b_views, 0, size):
            run.b_views = make_views(trunk, crops, size, desc="set B: frozen features")
            save_whole(lambda f: torch.save(run.b_views, f), b_path)
        views = StackedViews([views, run.b_views])
    return views, np.concatenate(rows)


def _load(run: Run, key: str, name: str) -> QualityNet:
    from fiqa_gate_training.export import load_weights

    return load_weights(_model(run.cfg[key]), run.out / f"{name}.safetensors")


def _pseudo(run: Run, network: str, set_name: str, out_name: str) -> None:
    from fiqa_gate_training.teacher import teacher_scores

    atomic_save_array(run.out / out_name, teacher_scores(run, network, set_name))


def stage_data(run: Run) -> None:
    from fiqa_gate_training.data import build

    build(run.cfg, run.data)


def stage_teacher(run: Run) -> None:
    _train(run, run.cfg["teacher"], "teacher", *run.labelled())


def stage_pseudo_a(run: Run) -> None:
    _pseudo(run, "teacher", "unlabelled_a", "pseudo_a.npy")


def _with_pseudo(run: Run, sets: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    crops, labels = run.labelled()
    parts_c, parts_y = [crops], [labels]
    for set_name, file in sets:
        parts_c.append(run.samples(set_name).crops)
        parts_y.append(np.load(run.out / file))
    return np.concatenate(parts_c), np.concatenate(parts_y)


def stage_enhanced(run: Run) -> None:
    _train(run, run.cfg["teacher"], "enhanced",
           *_with_pseudo(run, [("unlabelled_a", "pseudo_a.npy")]))


def stage_pseudo_b(run: Run) -> None:
    _pseudo(run, "enhanced", "unlabelled_b", "pseudo_b.npy")


STUDENT_DATA = {  # the paper's ablation: which sets each student is distilled from
    "student_l": [],
    "student_la": [("unlabelled_a", "pseudo_a.npy")],
    "student": [("unlabelled_a", "pseudo_a.npy"), ("unlabelled_b", "pseudo_b.npy")],
}


def _students(run: Run, stage: str
              ) -> list[tuple[str, list[tuple[str, str]], dict[str, Any]]]:
    """(name, pseudo-labelled sets, spec) of the networks stage `student` or `ablation`
    trains: the shipped student (labelled + A + B), or, with `ablation` in the config, the
    paper's ablation students (labelled; labelled + A) with the same spec, so the shipped
    student is the ablation's third arm."""
    if stage == "student":
        names = ["student"]
    else:
        names = ["student_la", "student_l"] if run.cfg.get("ablation") else []
    return [(name, STUDENT_DATA[name], run.cfg["student"]) for name in names]


def _distillation_set(run: Run, sets: list[tuple[str, str]],
                      spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A student's faces and targets. By default the paper's: labels on the labelled set,
    pseudo-labels on A (teacher) and B (enhanced teacher). With `targets: "enhanced"`,
    the enhanced teacher's score on every face, labelled ones included: smooth targets
    that carry the teacher's judgement to damage the labels never covered (`cpu` recipe:
    validation 0.6330 against 0.6310 with labels, but held-out validation 0.739 against
    0.773; docs/experiments.md)."""
    if spec.get("targets", "labels") == "labels":
        return _with_pseudo(run, sets)
    if spec["targets"] != "enhanced" or run.cfg.get("data", {}).get("mos_csv"):
        raise ValueError("student targets: 'labels', or 'enhanced' (without a MOS set)")
    from fiqa_gate_training.teacher import teacher_scores

    names = _set_names(run, sets)
    return (np.concatenate([run.samples(n).crops for n in names]),
            np.concatenate([teacher_scores(run, "enhanced", n) for n in names]))


def _set_names(run: Run, sets: list[tuple[str, str]]) -> list[str]:
    """The data sets a student's faces come from, in `_distillation_set`'s order."""
    return run.labelled_sets() + [set_name for set_name, _ in sets]


def _train_students(run: Run, stage: str) -> None:
    for name, sets, spec in _students(run, stage):
        if not (run.out / f"{name}.safetensors").exists():
            _train(run, spec, name, *_distillation_set(run, sets, spec),
                   sets=_set_names(run, sets))


def stage_student(run: Run) -> None:
    _train_students(run, "student")


def stage_ablation(run: Run) -> None:
    if not run.cfg.get("ablation"):
        log.warning("stage ablation: the config has no `ablation`; nothing to train")
    _train_students(run, "ablation")


def _size_runs(run: Run) -> list[tuple[str, dict[str, Any]]]:
    """(name, student spec) of the input-size comparison: every size and seed (`seeds`,
    default the student's), the same budget; one seed's gap is within the noise."""
    ab = run.cfg.get("input_size_ablation")
    if not ab:
        return []
    base = run.cfg["student"]
    own = base.get("seed", 0)
    return [(f"student_px{size}" + ("" if seed == own else f"_seed{seed}"),
             {**base, "input_size": size, "epochs": ab["epochs"], "seed": seed})
            for size in ab["sizes"] for seed in ab.get("seeds", [own])]


def stage_input_size(run: Run) -> None:
    crops, labels = _distillation_set(run, STUDENT_DATA["student"], run.cfg["student"])
    keep = run.cfg["input_size_ablation"].get("max_faces", len(crops))
    pick = np.sort(np.random.default_rng(0).permutation(len(crops))[:keep])
    for name, spec in _size_runs(run):
        if not (run.out / f"{name}.safetensors").exists():
            _train(run, spec, name, crops[pick], labels[pick],
                   sets=_set_names(run, STUDENT_DATA["student"]), pick=pick)


def stage_calibrate(run: Run) -> None:
    """Isotonic maps from raw output to P(match) on the validation identities, for the
    student and for the baselines (so every scorer can gate at the same --threshold)."""
    from fiqa_gate_training.export import run_onnx

    from fiqa_gate.evaluation.protocol import fit_calibrations, qualities
    from fiqa_gate.registry import get_recognizer

    val = run.samples("labelled_val")
    rec_name = run.cfg["data"]["recognizer"]
    # The student's map is fitted on the outputs of the graph that ships (int8 or float),
    # one face per run as the runtime scores it.
    raw = {"student": run_onnx(_student_graph(run)[0], val.crops,
                               run.cfg["student"]["input_size"], batch=1),
           **qualities(val, BASELINE_SCORERS, rec_name)[0]}
    fitted = {name: c.to_dict() for name, c in fit_calibrations(
        val, run.val_embeddings(), raw, get_recognizer(rec_name),
        "the validation identities").items()}
    student = fitted.pop("student")
    atomic_write_json(run.out / "baselines.json", {rec_name: {
        k: {"x": v["x"], "y": v["y"], "note": v["note"]} for k, v in fitted.items()}})
    atomic_write_json(run.out / "calibration.json", student)  # last: the stage's mark


BASELINE_SCORERS = ("sharpness", "detector-confidence", "embedding-norm")


def _student_graph(run: Run) -> tuple[Path, dict[str, Any]]:
    """export/student.onnx, the graph that ships, and its checks (made once): the float
    graph against torch, and, if the config quantises, the int8 graph against the float."""
    from fiqa_gate_training.export import export_onnx, quantize_int8

    from fiqa_gate.assets import sha256_file

    out = run.out / "export"
    checks_path = out / "graph_checks.json"
    weights = sha256_file(run.out / "student.safetensors")
    checks = read_state_json(checks_path)
    if checks is not None and checks.get("weights_sha256") == weights:  # else retrained
        return out / "student.onnx", checks
    spec = run.cfg["student"]
    out.mkdir(exist_ok=True)
    val = run.samples("labelled_val").crops
    checks = {"weights_sha256": weights, "int8_vs_float": None,
              "onnx_vs_torch_max_abs_diff": export_onnx(
                  _load(run, "student", "student"), out / "student-fp32.onnx",
                  spec["input_size"], val[:64])}
    if spec.get("quantize") == "int8":
        q = checks["int8_vs_float"] = quantize_int8(out / "student-fp32.onnx",
                                                    out / "student.onnx", val,
                                                    spec["input_size"])
        log.info("int8 vs float ONNX on %d validation faces: SRCC %.4f, max |diff| %.2e",
                 q["faces"], q["srcc"], q["max_abs_diff"])
    else:
        shutil.copy(out / "student-fp32.onnx", out / "student.onnx")
    atomic_write_json(checks_path, checks)
    return out / "student.onnx", checks


def stage_export(run: Run) -> None:
    from fiqa_gate_training.export import write_metadata
    from fiqa_gate_training.models import count_flops, count_parameters

    spec = run.cfg["student"]
    model = _load(run, "student", "student")
    out = run.out / "export"
    _, checks = _student_graph(run)
    diff, quantized = checks["onnx_vs_torch_max_abs_diff"], checks["int8_vs_float"]
    shutil.copy(run.out / "student.safetensors", out / "student.safetensors")
    shutil.copy(run.out / "baselines.json", out / "baselines.json")
    cal = json.loads((run.out / "calibration.json").read_text())
    write_metadata(out / "student.onnx", {
        "name": f"fiqa-gate student ({run.cfg['name']} recipe)",
        "architecture": spec["backbone"], "activation": spec.get("activation", "gelu"),
        "precision": "int8 MatMul weights (dynamic)" if quantized else "float32",
        "int8_vs_float": quantized, "input_size": spec["input_size"],
        "input": "float32 RGB 0..255, NCHW, aligned ArcFace crop resized to input_size",
        "recognizer": cal["recognizer"],
        "calibration": {"x": cal["x"], "y": cal["y"], "note": cal.get("note", "")},
        "parameters": count_parameters(model), "flops": count_flops(model, spec["input_size"]),
        "onnx_vs_torch_max_abs_diff": diff, "recipe": run.cfg["name"],
        "seeds": {k: run.cfg[k].get("seed", 0) for k in ("teacher", "student")}
                 | {"data": run.cfg["data"]["seed"]},
        "model_card": "student.md",
    })
    log.info("exported %s (ONNX vs torch max |diff| %.2e)", out / "student.onnx", diff)


def stage_report(run: Run) -> None:
    from fiqa_gate_training.report import write_report

    write_report(run)


STAGE_FUNCS: dict[str, Callable[[Run], None]] = {
    "data": stage_data, "teacher": stage_teacher, "pseudo_a": stage_pseudo_a,
    "enhanced": stage_enhanced, "pseudo_b": stage_pseudo_b, "student": stage_student,
    "calibrate": stage_calibrate, "export": stage_export, "ablation": stage_ablation,
    "input_size": stage_input_size, "report": stage_report,
}


def stage_done(run: Run, stage: str) -> bool:
    out = {"data": run.data / "labels.json", "teacher": run.out / "teacher.safetensors",
           "pseudo_a": run.out / "pseudo_a.npy", "enhanced": run.out / "enhanced.safetensors",
           "pseudo_b": run.out / "pseudo_b.npy",
           "calibrate": run.out / "calibration.json", "export": run.out / "export/student.json",
           "report": run.out / "report.json"}.get(stage)
    if stage in ("student", "ablation"):
        return all((run.out / f"{n}.safetensors").exists() for n, _, _ in _students(run, stage))
    if stage == "input_size":
        return all((run.out / f"{n}.safetensors").exists() for n, _ in _size_runs(run))
    return out is not None and out.exists()


def _check_inputs(run: Run) -> None:
    """Say so when the user's data changed since the data stage read it (the run goes on
    with the faces it made then)."""
    from fiqa_gate_training.data import user_inputs

    then = (read_state_json(run.data / "labels.json") or {}).get("user_inputs")
    if not then:  # a run from before this record, or of packages' data only
        return
    now = user_inputs(run.cfg["data"])
    if now != then:
        from fiqa_gate_training.sources import SOURCES

        d = run.cfg["data"]
        named = [d["labelled"].split(":", 1)[1] if d["labelled"].startswith("identity:")
                 else "", d.get("mos_csv") or "", d.get("mos_root") or "",
                 *(n for n in d.get("unlabelled") or [] if n not in SOURCES)]
        relative = any(n and not os.path.isabs(os.path.expanduser(n)) for n in named)
        log.warning("the data this config names changed since the data stage read it (%d "
                    "files then, %d now, or files changed)%s; this run goes on with the faces "
                    "made then: a new --out takes the changes in", then["files"], now["files"],
                    f" (its relative paths are taken from the working folder, {os.getcwd()})"
                    if relative else "")


def run_recipe(cfg: dict[str, Any], out: Path,
               stages: tuple[str, ...] = DEFAULT_STAGES, remake_report: bool = False,
               asked: bool = False) -> Run:
    """Run `stages` in order, skipping those whose output exists; with `remake_report` the
    report is made again (it reads every other stage's output and changes none). Stages
    `asked` for by name run even when the config's skip_stages leaves them out (editing
    the config would make it another run's)."""
    run = Run(cfg, out)
    if stage_done(run, "data"):  # whichever stages run, they read the faces made then
        _check_inputs(run)
    skipped = cfg.get("skip_stages", ())
    for stage in stages:
        if stage in skipped and not asked:
            log.info("stage %s: skipped (the config's skip_stages)", stage)
            continue
        if stage in ON_REQUEST and not cfg.get(ON_REQUEST[stage]):
            log.info("stage %s: nothing to run (the config asks for none)", stage)
            continue
        if stage == "report" and remake_report:
            run.times.pop(stage, None)
        elif stage_done(run, stage):
            log.info("stage %s: done already", stage)
            continue
        missing = [n for n in NEEDS.get(stage, ()) if not stage_done(run, n)]
        if missing:
            left = sorted(set(missing) & set(skipped))
            how = (f"the config's skip_stages leaves out {', '.join(left)} (--stage "
                   f"{' --stage '.join(left)} runs {'them' if len(left) > 1 else 'it'})"
                   if left else
                   f"run the recipe without --stage, or with --stage "
                   f"{' --stage '.join(missing)} first")
            raise RecipeError(f"stage {stage} reads the output of stage {', '.join(missing)}, "
                              f"which {out} does not hold: {how}")
        log.info("stage %s: start", stage)
        run.timed(stage, lambda stage=stage: STAGE_FUNCS[stage](run))
        log.info("stage %s: done in %.0f s", stage, run.times[stage])
    return run
