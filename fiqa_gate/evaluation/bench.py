"""`fiqa-gate bench`: what the gate costs next to what it saves, measured in one run.

Everything runs on real faces (ORL test identities, the insightface group photo) on this
machine; each figure is the median over repeats, every row timed in the same turns
(timing.measure_all), so ratios of rows compare the same moments.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fiqa_gate import models_dir, registry
from fiqa_gate.evaluation.timing import machine, measure_all, versions

if TYPE_CHECKING:
    import torch
    from fiqa_gate_training.models import QualityNet

    from fiqa_gate.student import OnnxStudentScorer

log = logging.getLogger("fiqa_gate")

PAPER_SIZE = 352
PIPELINE_SEED = 2718  # the damaged half of the pipeline rows' pictures


def _faces(n: int) -> tuple[np.ndarray, list[str]]:
    from fiqa_gate.datasets import ORL_TEST, orl_items
    from fiqa_gate.pipeline import faces_from_file, primary_face

    detector = registry.get_detector()
    paths = [str(p) for _, p in orl_items(ORL_TEST)][:n]
    crops = np.stack([primary_face(faces_from_file(p, detector)).crop for p in paths])
    return crops, paths


def _batch(crops: np.ndarray, size: int) -> np.ndarray:
    return crops[np.arange(size) % len(crops)]


def _torch_student(size: int, meta: dict[str, Any]) -> QualityNet:
    """The shipped student's weights in torch (needs the [train] extra)."""
    from fiqa_gate_training.models import build_model
    from safetensors.torch import load_file

    model = build_model({"backbone": meta["architecture"], "input_size": size,
                         "activation": meta.get("activation")})
    model.load_state_dict(load_file(str(models_dir() / "student.safetensors")))
    return model.eval()


def _paper_size_student(folder: Path, crops: np.ndarray,
                        meta: dict[str, Any]) -> OnnxStudentScorer:
    import json

    from fiqa_gate_training.export import export_onnx, quantize_int8

    from fiqa_gate.student import OnnxStudentScorer

    path = folder / "student352.onnx"
    export_onnx(_torch_student(PAPER_SIZE, meta), folder / "fp32.onnx", PAPER_SIZE, crops[:4])
    if meta.get("precision", "float32") != "float32":
        quantize_int8(folder / "fp32.onnx", path, crops[:4], PAPER_SIZE)
    else:
        (folder / "fp32.onnx").replace(path)
    path.with_suffix(".json").write_text(json.dumps({"input_size": PAPER_SIZE}))
    return OnnxStudentScorer(path, batch_size=64)


def _damaged_copies(paths: list[str], detector: Any, folder: Path) -> list[str]:
    """Seeded damaged copies of pictures (the recipes' kinds, as `evaluate` draws them),
    written as PNG; those whose face the detector still finds, as a pipeline keeps them."""
    from PIL import Image

    from fiqa_gate import degradations
    from fiqa_gate.images import load_image
    from fiqa_gate.pipeline import faces_in_image, primary_face

    rng = np.random.default_rng(PIPELINE_SEED)
    kept = []
    for i, path in enumerate(paths):
        image = load_image(path)
        detection = primary_face(faces_in_image(image, detector)).detection
        if detection is None:  # a detector's face always has one
            continue
        damaged = degradations.degrade(image, detection.landmarks, rng).image
        if faces_in_image(damaged, detector):
            target = folder / f"damaged_{i}.png"
            Image.fromarray(damaged).save(target)
            kept.append(str(target))
    return kept


def run_bench(repeats: int = 7, model: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fiqa-gate-bench-") as scratch:
        return _bench(Path(scratch), repeats, model)


def _bench(scratch: Path, repeats: int, model: str | None) -> dict[str, Any]:
    from fiqa_gate.student import OnnxStudentScorer

    out: dict[str, Any] = {"machine": machine(), "versions": versions(), "repeats": repeats,
                           "unit": "ms per face", "timings": {}}
    t = out["timings"]
    jobs: list[tuple[str, Any, int]] = []

    def rec(name: str, fn: Callable[[], object], faces: int) -> None:
        jobs.append((name, fn, faces))  # timed together, in turns, once all are set up

    crops, paths = _faces(64)
    x1, x64 = _batch(crops, 1), _batch(crops, 64)

    student = OnnxStudentScorer(model, batch_size=64)
    rec("student onnxruntime 112 px, batch 1", lambda: student.raw_from_crops(x1), 1)
    rec("student onnxruntime 112 px, batch 64", lambda: student.raw_from_crops(x64), 64)
    # as a scoring-only job runs it, on every core like the recognizers' defaults
    every_core = OnnxStudentScorer(model, batch_size=64, threads=None)
    for batch, xs in ((1, x1), (64, x64)):
        rec(f"student onnxruntime 112 px, batch {batch}, every core",
            lambda xs=xs: every_core.raw_from_crops(xs), batch)

    has_torch = all(importlib.util.find_spec(m) for m in ("torch", "timm", "safetensors"))
    if has_torch and model is None and (models_dir() / "student.safetensors").exists():
        import torch
        from fiqa_gate_training.train import to_input

        for size in (112, PAPER_SIZE):
            net = _torch_student(size, student.meta)
            for batch, xs in ((1, x1), (64, x64)):
                inp = to_input(xs, size)

                def fwd(net: QualityNet = net, inp: torch.Tensor = inp) -> torch.Tensor:
                    with torch.no_grad():
                        return net(inp)

                rec(f"student torch {size} px, batch {batch}", fwd, batch)
        # The same weights exported at the paper's input size and prepared exactly as the
        # shipped file (precision, metadata), run through the same scorer class, threads
        # and preprocessing (the resize to 352 px included): only the input size differs.
        paper = _paper_size_student(scratch, crops, student.meta)
        rec(f"student onnxruntime {PAPER_SIZE} px, batch 1", lambda: paper.raw_from_crops(x1), 1)
        rec(f"student onnxruntime {PAPER_SIZE} px, batch 64",
            lambda: paper.raw_from_crops(x64), 64)
    else:
        out["torch"] = (f"torch and {PAPER_SIZE} px rows skipped: " + (
            "not installed (pip install 'fiqa-gate[train]')" if not has_torch else
            "they time the shipped student's weights, not --model's" if model is not None
            else "the shipped student.safetensors is missing"))
        log.warning("bench: %s", out["torch"])

    # Detection: one ORL portrait and the group photo with six faces.
    from fiqa_gate.images import load_image

    detector = registry.get_detector()
    portrait = load_image(paths[0])
    rec("detection (YuNet) ORL 92x112 image", lambda: detector.detect(portrait), 1)
    photo_path = Path(importlib.util.find_spec("insightface").origin).parent / "data" / \
        "images" / "t1.jpg"
    photo = load_image(str(photo_path))
    n_photo = len(detector.detect(photo))
    rec(f"detection (YuNet) 1280x886 photo, per face ({n_photo} faces)",
        lambda: detector.detect(photo), n_photo)

    recognizers = {}
    for name in registry.registry().recognizers:
        try:
            recognizers[name] = registry.get_recognizer(name)
        except Exception as exc:  # a missing optional recognizer is a note, not a failure
            out.setdefault("skipped", {})[name] = str(exc).splitlines()[0]
    for name, r in recognizers.items():
        rec(f"embedding {name}, batch 1", lambda r=r: r.embed(x1), 1)
        rec(f"embedding {name}, batch 64", lambda r=r: r.embed(x64), 64)
    # The gate's cost beside SFace's on equal terms: the student runs on one thread in the
    # gate, so SFace is also timed on one (cost); the latency ratio has both on every core.
    try:
        sface_1 = (registry.registry().recognizers["sface"].factory(threads=1)
                   if "sface" in recognizers else None)
    except TypeError:  # an `sface` plugin without a thread setting
        sface_1 = None
        out.setdefault("skipped", {})["sface, 1 thread"] = "its plugin takes no threads"
    if sface_1 is not None:
        for batch, xs in ((1, x1), (64, x64)):
            rec(f"embedding sface, batch {batch}, 1 thread (as the student)",
                lambda xs=xs: sface_1.embed(xs), batch)

    # The pipeline per image of one face: load, detect, align, (score,) embed. Half the
    # pictures are damaged, so the gate rejects some and the row shows what that saves.
    from fiqa_gate.gate import Gate
    from fiqa_gate.pipeline import faces_from_file

    sface = recognizers.get("sface")
    if sface is not None:
        # as the CLI's gate: the detector checks a rejected face's alignment
        gate = Gate(student, threshold=0.5, use_plugins=False, detector=detector)
        few = paths[:16] + _damaged_copies(paths[16:32], detector, scratch)
        decided = gate.decide([f for p in few for f in faces_from_file(p, detector)])
        out["pipeline_pictures"] = {"clean": 16, "damaged": len(few) - 16,
                                    "accepted_by_gate": sum(d.accepted for d in decided)}

        def ungated() -> None:
            faces = [f for p in few for f in faces_from_file(p, detector)]
            sface.embed(np.stack([f.crop for f in faces]))

        def gated() -> None:
            faces = [f for p in few for f in faces_from_file(p, detector)]
            decisions = gate.decide(faces)
            kept = [f for f, d in zip(faces, decisions, strict=True) if d.accepted]
            if kept:
                sface.embed(np.stack([f.crop for f in kept]))

        rec("pipeline without gate (load+detect+align+embed sface)", ungated, len(few))
        rec("pipeline with gate (load+detect+align+score+embed accepted)", gated, len(few))
    log.info("timing %d rows in %d turns", len(jobs), repeats)
    for name, timing in measure_all(jobs, repeats=repeats).items():
        t[name] = timing.to_dict()
        log.info("%s: %.3f ms/face", name, timing.ms_per_face)
    if sface is not None:
        for batch in (1, 64):
            gate_ms = t[f"student onnxruntime 112 px, batch {batch}"]["ms_per_face"]
            one = t.get(f"embedding sface, batch {batch}, 1 thread (as the student)")
            if one is not None:
                out[f"gate_to_sface_cost_ratio_batch_{batch}"] = gate_ms / one["ms_per_face"]
            out[f"gate_to_sface_latency_ratio_batch_{batch}"] = (
                t[f"student onnxruntime 112 px, batch {batch}, every core"]["ms_per_face"]
                / t[f"embedding sface, batch {batch}"]["ms_per_face"])
    if f"student onnxruntime {PAPER_SIZE} px, batch 64" in t:
        for batch in (1, 64):
            out[f"speedup_112_vs_{PAPER_SIZE}_onnxruntime_batch_{batch}"] = (
                t[f"student onnxruntime {PAPER_SIZE} px, batch {batch}"]["ms_per_face"]
                / t[f"student onnxruntime 112 px, batch {batch}"]["ms_per_face"])
    return out
