"""The training pipeline on real faces: converter, degradations, labels, stages, export."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import orl_people
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from fiqa_gate import degradations  # noqa: E402
from fiqa_gate.datasets import Samples, build_samples, detect_sources, orl_items  # noqa: E402
from fiqa_gate.registry import get_detector, get_recognizer  # noqa: E402


@pytest.fixture(scope="module")
def orl_sources():
    return detect_sources(orl_items(["s1", "s2"]), get_detector())


def test_degradations_are_seeded_recorded_and_replayable(orl_sources):
    face = orl_sources[0]
    lm = face.detection.landmarks
    one = degradations.degrade(face.image, lm, np.random.default_rng(5))
    two = degradations.degrade(face.image, lm, np.random.default_rng(5))
    assert one.record == two.record and np.array_equal(one.image, two.image)
    replay = degradations.apply(face.image, lm, json.loads(json.dumps(one.record)))
    assert np.array_equal(replay.image, one.image)
    assert np.allclose(replay.landmarks, one.landmarks)
    for kind in degradations.KINDS + degradations.EXTRA_KINDS:
        params = degradations.draw(kind, 0.8, np.random.default_rng(0), lm)
        out = degradations.apply(face.image, lm, [params])
        changed = (not np.array_equal(out.image, face.image)
                   or not np.allclose(out.landmarks, lm))
        assert changed, f"{kind} left the face untouched"
    with pytest.raises(ValueError, match="unknown degradation"):
        degradations.draw("sepia", 0.5, np.random.default_rng(0), lm)


def test_sface_converted_to_torch_matches_onnxruntime(orl_sources):
    from fiqa_gate_plugins.sface import repaired_sface_path
    from fiqa_gate_training.models import sface_backbone

    samples = build_samples(orl_sources[:8], get_detector(), 1, seed=0)
    backbone, width = sface_backbone(str(repaired_sface_path()))
    backbone.eval()
    with torch.no_grad():
        got = backbone(torch.from_numpy(samples.crops).permute(0, 3, 1, 2).float()).numpy()
    want = get_recognizer("sface").embed_raw(samples.crops)
    assert width == 128
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_utility_labels_by_hand():
    from fiqa_gate_training.data import utility_labels

    # Identity A: a clean face (0), its degraded copy (1), another clean photo (2).
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    samples = Samples(np.zeros((4, 112, 112, 3), np.uint8), ["A", "A", "A", "B"],
                      ["a1", "a1", "a2", "b1"], [[], [{"kind": "jpeg"}], [], []],
                      np.ones(4))
    samples_b = Samples(np.zeros((1, 112, 112, 3), np.uint8), ["B"], ["b2"], [[]], np.ones(1))
    both = Samples.concat([samples, samples_b])
    emb = np.vstack([emb, [[0.0, 1.0]]])
    label, matched, _ = utility_labels(both, emb, threshold=0.7, temperature=0.05)
    # face 1 (copy of a1) is compared only with a2: cos = 0.6*0.8 + 0.8*0.6 = 0.96 >= 0.7
    assert matched[1] == 1.0
    # face 0 vs a2: cos 0.8 -> match; face 2 vs a1 (face 0 only, clean): 0.8 -> match
    assert matched[0] == 1.0 and matched[2] == 1.0
    assert label[1] == pytest.approx(1 / (1 + np.exp(-(0.96 - 0.7) / 0.05)))
    assert matched[3] == 1.0 and matched[4] == 1.0  # B's two photos are identical


def test_fit_resumes_from_its_checkpoint(tmp_path, caplog, orl_sources):
    from fiqa_gate_training.models import build_model
    from fiqa_gate_training.train import fit

    samples = build_samples(orl_sources[:4], get_detector(), 1, seed=0)
    spec = {"backbone": "edgenext_xx_small", "input_size": 112, "epochs": 2, "batch_size": 4,
            "lr": 1e-3, "weight_decay": 0.0, "seed": 0, "ema": 0.99}
    ckpt = tmp_path / "m.ckpt"
    targets = np.linspace(0, 1, len(samples))
    # max_steps stops the loop after one epoch, as an interruption would
    fit(build_model(spec), samples.crops, targets, {**spec, "max_steps": 100}, ckpt, "m")
    first = torch.load(ckpt, weights_only=True)
    assert first["epoch"] == 1 and first["ema"]["steps"] > 0
    with caplog.at_level(logging.INFO, logger="fiqa_gate.training"):
        fit(build_model(spec), samples.crops, targets, spec, ckpt, "m")
    assert "resumed after epoch 1" in caplog.text
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2
    assert state["ema"]["steps"] == 2 * first["ema"]["steps"]  # the average resumed too


def test_a_resumed_fit_ends_where_an_uninterrupted_one_does(tmp_path, orl_sources):
    """Drop-path draws from torch's global generator, which a new process seeds afresh: a
    resumed student differed from an uninterrupted one (training audit of 2026-12-08)."""
    from fiqa_gate_training.models import build_model
    from fiqa_gate_training.train import fit

    samples = build_samples(orl_sources[:4], get_detector(), 1, seed=0)
    spec = {"backbone": "edgenext_xx_small", "input_size": 112, "epochs": 2, "batch_size": 4,
            "lr": 1e-3, "weight_decay": 0.0, "seed": 0, "drop_path": 0.5}
    targets = np.linspace(0, 1, len(samples))

    def model() -> torch.nn.Module:
        torch.manual_seed(0)  # the same first weights (a resumed fit loads its own)
        return build_model(spec)

    whole = fit(model(), samples.crops, targets, spec, tmp_path / "a.ckpt", "a")
    cut = tmp_path / "b.ckpt"
    fit(model(), samples.crops, targets, {**spec, "max_steps": 100}, cut, "b")
    torch.manual_seed(1)  # a new process: the generator is wherever it is
    resumed = fit(build_model(spec), samples.crops, targets, spec, cut, "b")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_weight_average_by_hand():
    from fiqa_gate_training.train import WeightAverage
    from torch import nn

    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = WeightAverage(model, decay=0.5)
    model.weight.data.fill_(1.0)
    ema.update(model)  # keep min(0.5, 2/11) of the old weight
    assert ema.model.weight.item() == pytest.approx(9 / 11)
    ema.update(model)  # keep min(0.5, 3/12)
    assert ema.model.weight.item() == pytest.approx(9 / 11 * 0.25 + 0.75)
    for _ in range(20):
        ema.update(model)  # the ramp has reached the decay: keep half
    before = ema.model.weight.item()
    model.weight.data.fill_(3.0)
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(0.5 * before + 1.5)
    assert model.weight.item() == 3.0 and not ema.model.weight.requires_grad


def test_weight_average_follows_batchnorm_statistics_and_copies_counters():
    """A BatchNorm student's averaged weights must be used with averaged running statistics
    (the live model's would not fit them); the batch counter is an integer: copied."""
    from fiqa_gate_training.train import WeightAverage
    from torch import nn

    model = nn.BatchNorm1d(1)
    ema = WeightAverage(model, decay=0.5)
    model.running_mean.fill_(1.0)
    model.num_batches_tracked.fill_(7)
    ema.update(model)  # keep 2/11 of the old mean 0
    assert ema.model.running_mean.item() == pytest.approx(9 / 11)
    assert ema.model.num_batches_tracked.item() == 7


def test_paper_config_takes_one_step_on_two_faces(orl_sources, tmp_path):
    """Swin-B teacher at 448 px and the 352 px student: the code path must not rot."""
    from fiqa_gate_training.models import build_model
    from fiqa_gate_training.recipe import load_config
    from fiqa_gate_training.train import fit, predict

    cfg = load_config("paper")
    crops = build_samples(orl_sources[:2], get_detector(), 0, seed=0).crops
    for key in ("teacher", "student"):
        spec = {**cfg[key], "max_steps": 1, "batch_size": 2}
        model = build_model(spec)
        before = [p.detach().clone() for p in model.parameters()]
        fit(model, crops, np.array([0.2, 0.9]), spec, tmp_path / f"{key}.ckpt", key)
        changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(),
                                                             strict=True))
        assert changed, f"{key}: one optimisation step changed nothing"
        assert predict(model, crops, spec["input_size"]).shape == (2,)


def test_smoke_recipe_end_to_end_then_resume(tmp_path):
    """All stages through the CLI, the export loads in the runtime, a rerun does nothing."""
    from fiqa_gate.student import OnnxStudentScorer

    out = tmp_path / "run"
    out.mkdir()
    (out / "provenance.md").write_text("resumed from a copied folder\n")
    cmd = [sys.executable, "-m", "fiqa_gate", "train", "run", "smoke", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "export" / "student.json").read_text())
    assert meta["onnx_vs_torch_max_abs_diff"] <= 1e-4
    assert meta["parameters"] > 1e6 and meta["flops"] > 1e7
    assert meta["activation"] == "relu" and meta["precision"].startswith("int8")
    assert meta["int8_vs_float"]["faces"] > 0 and -1 <= meta["int8_vs_float"]["srcc"] <= 1
    # The paper's ablation students, with the shipped one's spec: only when asked for.
    assert not (out / "student_l.safetensors").exists()
    ablation = subprocess.run([*cmd, "--stage", "ablation"], capture_output=True, text=True,
                              timeout=600)
    assert ablation.returncode == 0, ablation.stderr[-3000:]
    assert (out / "student_l.safetensors").exists() and (out / "student_la.safetensors").exists()
    # Without a model card (smoke skips the report stage) nothing replaces the shipped model.
    import click
    from fiqa_gate_training.cli import install_student

    from fiqa_gate import models_dir

    shipped = {p.name: p.read_bytes() for p in models_dir().iterdir() if p.is_file()}
    with pytest.raises(click.UsageError, match=r"lacks student\.md"):
        install_student(out / "export")
    assert {p.name: p.read_bytes() for p in models_dir().iterdir() if p.is_file()} == shipped
    # The smoke config skips the report stage (2 min); the model card's code runs here.
    from fiqa_gate_training.recipe import Run, load_config
    from fiqa_gate_training.report import write_report

    report = write_report(Run(load_config("smoke"), out))
    assert {"sface", "dlib"} <= set(report["edc"])
    assert 0 < report["edc"]["sface"]["student"]["pauc_norm_20"] < 2
    assert "student_l (ablation: labelled only)" in report["edc"]["sface"]
    card = (out / "export" / "student.md").read_text()
    assert "Provenance: resumed from a copied folder\n" in card
    assert "Reproduce: `fiqa-gate train run smoke --stage report`" in card
    # a run of a user's own config and data had a card that named ORL's 24 identities, a
    # hash split and `train run cpu` (training audit of 2026-12-08)
    from fiqa_gate_training.report import model_card

    own = json.loads(json.dumps(load_config("smoke")))
    own["name"], own["data"]["labelled"] = "mine", "identity:/data/people"
    own["data"]["val_identities"] = ["zoe"]
    text = model_card(report, own)
    assert "Reproduce: `fiqa-gate train run RUN/config.json --out RUN --stage report`" in text
    assert "Trained on the training identities of `/data/people`" in text
    assert "identities as the config names them" in text and "ORL faces" not in text
    import timm  # the packages a run's numbers depend on, as on its host

    assert f"timm {timm.__version__}" in card and report["versions"]["timm"] == timm.__version__
    log_text = (out / "train.log").read_text()
    assert "validation" in log_text  # selection on validation EDC ran
    # ... beside the free baseline, the recognizer's norm, on the same faces
    assert re.search(r"validation: \d+ faces; sface's embedding norm scores 0\.\d{4} there",
                     log_text)
    assert "student: hint from the frozen trunk" in log_text  # labelled + A have views
    # The fused teachers: pseudo-labels B are the enhanced network's output fused with
    # SFace's embedding norm, recomputed here from the cached parts.
    from fiqa_gate_training.teacher import fuse

    stats = json.loads((out / "fusion_enhanced.json").read_text())
    net_b = np.load(out / "network_enhanced_unlabelled_b.npy")
    norm_b = np.load(out / "data" / "unlabelled_b_embedding_norm.npy")
    assert np.allclose(np.load(out / "pseudo_b.npy"), fuse(stats, net_b, norm_b))
    assert not np.allclose(np.load(out / "pseudo_b.npy"), net_b)
    # Both parts come from one pass through the trunk the enhanced network shares with
    # SFace: each matches its own network run whole.
    from fiqa_gate_training.export import load_weights
    from fiqa_gate_training.models import build_model
    from fiqa_gate_training.train import predict

    b = Samples.load(out / "data" / "unlabelled_b.npz")
    enhanced = load_weights(build_model(load_config("smoke")["teacher"]),
                            out / "enhanced.safetensors")
    assert np.allclose(net_b[-4:], predict(enhanced, b.crops[-4:], 112), atol=1e-4)
    whole = get_recognizer("sface").embed_with_norms(b.crops[-4:])[1]
    assert np.allclose(norm_b[-4:], whole, rtol=1e-5)
    # `student.hint.set_b`: set B's trunk views, computed once, follow the teachers'.
    from fiqa_gate_training.recipe import _trunk_views
    from fiqa_gate_training.train import make_views, split

    sets = ["labelled_train", "unlabelled_a", "unlabelled_b"]
    run = Run(load_config("smoke"), out)
    own, rows = _trunk_views(run, sets, set_b=False)
    views, rows_b = _trunk_views(run, sets, set_b=True)
    assert (rows[-len(b):] == -1).all() and (rows_b[:-len(b)] == rows[:-len(b)]).all()
    assert (rows_b[-len(b):] == len(own) + np.arange(len(b))).all()
    trunk = split(enhanced, load_config("smoke")["teacher"]["freeze"])[0]
    assert torch.allclose(views[torch.as_tensor(rows_b[-2:]), 1].float(),
                          make_views(trunk, b.crops[-2:], 112)[:, 1].float(), atol=1e-2)
    # The runtime's `--scorer teacher` (torch-free, the report's export) gives the
    # enhanced teacher's pseudo-labels back.
    from fiqa_gate.teacher import FusedTeacherScorer

    exported = FusedTeacherScorer(out / "export" / "teacher.onnx")
    assert exported.fusion == stats
    assert np.allclose(exported.raw_from_crops(b.crops[-4:]), np.load(out / "pseudo_b.npy")[-4:],
                       atol=1e-3)
    # The labelled faces' norms come from the data stage's labelling pass: the plugin's own.
    from fiqa_gate.evaluation.protocol import qualities

    train = Samples.load(out / "data" / "labelled_train.npz")
    norms = np.load(out / "data" / "labelled_train_embedding_norm.npy")
    plugin = qualities(train.subset(np.arange(4)), ["embedding-norm"], "sface")[0]
    assert len(norms) == len(train)
    assert np.allclose(norms[:4], plugin["embedding-norm"], rtol=1e-5)
    # Set B also holds fresh degradations of the labelled images, anonymous: one per image.
    copies = [i for i, s in enumerate(b.source) if s in set(train.source)]
    assert len(copies) == len(set(train.source))
    assert all(b.identity[i] is None and b.records[i] for i in copies)
    assert len(np.load(out / "pseudo_b.npy")) == len(b)
    assert not any(np.array_equal(b.crops[i], c) for i in copies[:3] for c in train.crops)
    # The memory plan, made before any face was degraded, counted the faces it then built.
    plan = json.loads((out / "data" / "labels.json").read_text())["memory_plan"]
    built = {name: len(Samples.load(out / "data" / f"{name}.npz")) for name in
             ("labelled_train", "labelled_val", "unlabelled_a", "unlabelled_b")}
    assert plan["faces_per_set"] == {**built, "mos": 0}
    assert plan["trunk_views_gib"] > 0 and plan["peak_gib"] > plan["crops_gib"]
    scorer = OnnxStudentScorer(out / "export" / "student.onnx")
    crops = Samples.load(out / "data" / "labelled_val.npz").crops[:16]
    raw = scorer.raw_from_crops(crops)
    assert raw.shape == (16,) and np.isfinite(raw).all()
    calibrated = scorer.calibration(raw)
    assert ((calibrated >= 0) & (calibrated <= 1)).all()
    assert all(b >= a for a, b in zip(meta["calibration"]["y"], meta["calibration"]["y"][1:],
                                      strict=False))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stderr.count("done already") >= 8


def test_a_run_that_cannot_fit_in_memory_is_refused_before_its_data_is_built(tmp_path,
                                                                              monkeypatch):
    from fiqa_gate_training import data
    from fiqa_gate_training.recipe import load_config

    from fiqa_gate.errors import FiqaGateError

    cfg = load_config("smoke")
    monkeypatch.setattr(data, "available_memory", lambda: 2 * data.GiB)
    big = {**cfg, "data": {**cfg["data"], "variants": 4000}}  # 7 GiB of crops
    with pytest.raises(FiqaGateError, match=r"about \d+\.\d GiB .* data\.variants"):
        data.build(big, tmp_path / "data")
    assert not list((tmp_path / "data").glob("*.npz"))  # refused before any set was built
    plan = data.memory_plan(big, {"labelled_train": 30, "labelled_val": 20, "unlabelled_a": 5,
                                  "unlabelled_b": 6}, 0)
    assert plan["faces_per_set"]["labelled_train"] == 30 * 4001
    assert plan["faces_per_set"]["unlabelled_b"] == 6 * 2 + 30 * 1  # + the labelled copies
    # SFace's trunk to layer 73: 512 x 7 x 7 float16, the face and its mirror
    assert data.trunk_view_bytes(cfg["teacher"]) == 2 * 2 * 512 * 7 * 7
    data.check_memory(plan, available=int(plan["peak_gib"] * data.GiB) + 1)  # fits: no error
    with pytest.raises(FiqaGateError, match="memory_check"):
        data.check_memory(plan, available=int(plan["peak_gib"] * data.GiB) - 1)


def test_each_face_is_compared_with_at_most_max_references_good_references():
    from fiqa_gate.evaluation.protocol import reference_pairs

    n = 100  # one person, 100 photos: clean faces plus one degraded copy of each
    samples = Samples(np.zeros((2 * n, 1, 1, 3), np.uint8), ["A"] * (2 * n),
                      [f"p{i}" for i in range(n)] * 2, [[]] * n + [[{"kind": "jpeg"}]] * n,
                      np.ones(2 * n))
    faces, refs = reference_pairs(samples, max_references=64)
    assert np.array_equal(np.bincount(faces), np.full(2 * n, 64))
    src = np.asarray(samples.source)
    assert (src[faces] != src[refs]).all() and samples.clean[refs].all()
    assert len({(f, r) for f, r in zip(faces, refs, strict=True)}) == len(faces)
    assert not np.array_equal(refs[:64], refs[64:128])  # each face gets its own sample
    again = reference_pairs(samples, max_references=64)
    assert np.array_equal(again[1], refs)  # seeded
    faces, refs = reference_pairs(samples, max_references=n)  # under the cap: all of them
    assert np.array_equal(np.bincount(faces), np.full(2 * n, n - 1))


def test_set_b_draws_extra_kinds_and_an_unknown_kind_is_refused_before_any_work(
        tmp_path, orl_sources):
    from fiqa_gate_training import data
    from fiqa_gate_training.recipe import load_config

    from fiqa_gate.errors import FiqaGateError

    cfg = load_config("smoke")
    assert data.distillation_kinds(cfg["data"]) == degradations.KINDS
    extra = {**cfg["data"], "b_extra_kinds": ["pixelate", "colour_cast", "jpeg", "pixelate"]}
    assert data.distillation_kinds(extra) == (*degradations.KINDS, "pixelate", "colour_cast")
    with pytest.raises(FiqaGateError, match=r"unknown degradation.*sepia"):
        data.build({**cfg, "data": {**cfg["data"], "b_extra_kinds": ["sepia"]}},
                   tmp_path / "data")
    assert not (tmp_path / "data").exists()
    # The copies set B takes of the labelled images draw from the kinds they are given.
    b = data._unlabelled_copies(orl_sources[:4], get_detector(), 30, 5,
                                kinds=data.distillation_kinds(extra))
    drawn = {step["kind"] for rec in b.records for step in rec}
    assert {"pixelate", "colour_cast"} <= drawn <= set(data.distillation_kinds(extra))
    plain = data._unlabelled_copies(orl_sources[:4], get_detector(), 30, 5)
    assert {step["kind"] for rec in plain.records for step in rec} <= set(degradations.KINDS)


def test_pixel_batches_mirror_the_chosen_faces_and_leave_the_training_set_alone():
    from fiqa_gate_training.train import pixel_batch, to_input

    crops = np.random.default_rng(0).integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
    kept = crops.copy()
    idx, flips = torch.tensor([4, 1, 4]), torch.tensor([1, 0, 0])
    got = pixel_batch(crops, idx, flips, 112)
    assert torch.equal(got[0], to_input(crops[4:5, :, ::-1], 112)[0])  # mirrored
    assert torch.equal(got[1], to_input(crops[1:2], 112)[0])
    assert torch.equal(got[2], to_input(crops[4:5], 112)[0])  # the same face, as it is
    assert np.array_equal(crops, kept)
    assert pixel_batch(crops, idx, flips, 352).shape == (3, 3, 352, 352)


def test_fusion_rises_with_either_input_and_keeps_the_label_scale():
    from fiqa_gate_training.teacher import fuse

    stats = {"net_mean": 0.5, "net_std": 0.2, "norm_mean": 2.0, "norm_std": 0.5,
             "mix_std": 0.8, "label_mean": 0.6, "label_std": 0.4}
    at_means = fuse(stats, np.array([0.5]), np.exp([2.0]))
    assert np.allclose(at_means, 0.6)
    assert fuse(stats, np.array([0.7]), np.exp([2.0]))[0] > at_means[0]
    assert fuse(stats, np.array([0.5]), np.exp([2.5]))[0] > at_means[0]
    # one spread of the mix is one spread of the labels
    both_up = fuse(stats, np.array([0.5 + 0.2 * 0.8]), np.exp([2.0 + 0.5 * 0.8]))
    assert np.allclose(both_up, 0.6 + 0.4)


def test_frozen_views_of_a_known_prefix_are_reused_not_recomputed():
    from fiqa_gate_training.train import make_views
    from torch import nn

    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.AdaptiveAvgPool2d(2)).eval()
    crops = np.random.default_rng(0).integers(0, 256, (10, 112, 112, 3), dtype=np.uint8)
    full = make_views(trunk, crops, 112)
    prefix = make_views(trunk, crops[:4], 112)
    assert torch.equal(make_views(trunk, crops, 112, known=prefix), full)
    # computed through ONNX Runtime: the torch trunk's output, mirrored view included
    from fiqa_gate_training.train import to_input

    with torch.no_grad():
        x = to_input(crops, 112)
        want = torch.stack([trunk(x), trunk(x.flip(-1))], 1)
    assert torch.allclose(full.float(), want, rtol=2e-3, atol=1e-2)  # stored as float16
    with pytest.raises(ValueError, match="do not belong"):
        make_views(trunk, crops[5:], 112, known=prefix)


def test_stacked_views_index_like_the_joined_tensor():
    from fiqa_gate_training.train import StackedViews

    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(5, 2, 3, 2, 2, generator=gen).half(),
             torch.randn(4, 2, 3, 2, 2, generator=gen).half()]
    joined, stacked = torch.cat(parts), StackedViews(parts)
    assert stacked.shape == joined.shape and len(stacked) == 9
    rows = torch.tensor([8, 0, 4, 5, 5, 2])
    flips = torch.tensor([1, 0, 1, 0, 1, 1])
    assert torch.equal(stacked[rows, flips], joined[rows, flips])
    assert torch.equal(stacked[rows, 0], joined[rows, 0])


def test_input_size_means_average_the_seeds_of_each_size():
    from fiqa_gate_training.report import _input_size_means, size_row

    runs = [(n, {"input_size": size, "epochs": 4, "seed": seed})
            for n, size, seed in (("a", 112, 1), ("b", 112, 2), ("c", 352, 1))]
    figures = [(0.8, 0.7), (0.6, 0.5), (0.9, 0.8)]
    table = {size_row(spec): {"pauc_norm_20": p20, "pauc_norm_30": p30}
             for (_, spec), (p20, p30) in zip(runs, figures, strict=True)}
    table["student"] = {"pauc_norm_20": 0.1, "pauc_norm_30": 0.1}
    got = _input_size_means({"sface": table}, runs)["sface"]
    assert got["112"]["seeds"] == 2 and got["352"]["seeds"] == 1
    assert got["112"]["pauc_norm_20"] == pytest.approx(0.7)
    assert got["112"]["pauc_norm_30"] == pytest.approx(0.6)
    assert got["352"]["pauc_norm_20"] == pytest.approx(0.9)
    assert _input_size_means({"sface": table}, []) == {}


def test_model_card_says_which_extra_kinds_set_b_drew_and_whether_one_was_held_out():
    from fiqa_gate_training.report import _extra_kinds_note

    assert _extra_kinds_note([]) == ""
    unspent = _extra_kinds_note(list(degradations.EXTRA_KINDS[:2]))
    assert all(k in unspent for k in degradations.EXTRA_KINDS[:2])
    assert "none of them is a held-out kind" in unspent
    spent = _extra_kinds_note([degradations.HELD_OUT_KINDS[0], degradations.EXTRA_KINDS[0]])
    assert f"so {degradations.HELD_OUT_KINDS[0]} is not held out" in spent
    assert "none of them" not in spent


@pytest.mark.parametrize("size,args", [(112, {}), (64, {}), (112, {"depths": [3, 3, 9, 3]})])
def test_folded_student_computes_what_the_student_computes(size, args):
    from fiqa_gate_training.export import folded
    from fiqa_gate_training.models import build_model
    from timm.models.edgenext import ConvBlock, SplitTransposeBlock

    torch.manual_seed(0)
    model = build_model({"backbone": "edgenext_xx_small", "input_size": size,
                         "activation": "relu", "backbone_args": args}).eval()
    blocks_per_stage = [sum(isinstance(b, ConvBlock | SplitTransposeBlock) for b in st.blocks)
                        for st in model.backbone.stages]
    assert blocks_per_stage == args.get("depths", [2, 2, 6, 2])  # the variant was built
    for name, p in model.named_parameters():  # trained-looking scales and biases, not init
        if name.endswith(("gamma", "bias")):
            p.data.uniform_(0.5, 1.5)
    fast = folded(model, size)
    x = torch.rand(3, 3, size, size) * 255
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-4, rtol=1e-4)
    assert isinstance(fast.normalise, torch.nn.Identity)
    blocks = [m for m in fast.modules() if isinstance(m, SplitTransposeBlock)]
    assert blocks and all(b.gamma is None for b in blocks)
    assert model.normalise is not fast.normalise and any(  # the original is left untouched
        b.gamma is not None for b in model.modules() if isinstance(b, SplitTransposeBlock))


@pytest.mark.parametrize("backbone", ["mobilenetv3_small_100", "lcnet_050"])
def test_students_that_widen_after_pooling_get_a_head_of_that_width(backbone):
    """MobileNetV3-style timm nets add a 1x1 conv after pooling (num_features is the width
    before it): the quality head must take what the backbone really outputs."""
    from fiqa_gate_training.models import build_model

    model = build_model({"backbone": backbone, "input_size": 112}).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 112, 112) * 255)
    assert out.shape == (2,)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backbone,args", [("edgenext_xx_small", {"activation": "relu"}),
                                           ("mobilenetv4_conv_small", {})])
def test_trunk_hint_teaches_the_student_and_leaves_nothing_behind(orl_sources, tmp_path,
                                                                  backbone, args):
    """The hint from SFace's frozen trunk adds a gradient (one step with it differs from one
    without), skips faces the trunk never saw, and the trained student is a plain network:
    no hook left on it, no projection among its weights. timm names a backbone's stages
    `stages` (EdgeNeXt) or `blocks` (MobileNets): both take the hint."""
    from fiqa_gate_training.models import build_model
    from fiqa_gate_training.train import fit, make_views, split

    crops = build_samples(orl_sources[:4], get_detector(), 0, seed=0).crops
    trunk = split(build_model({"backbone": "sface", "input_size": 112}), 73)[0]
    views = make_views(trunk, crops[:3], 112)  # the fourth face has no trunk view
    rows = np.array([0, 1, 2, -1])
    base = {"backbone": backbone, "input_size": 112, "epochs": 1, "batch_size": 4,
            "lr": 2e-3, "weight_decay": 0.05, "seed": 13, "max_steps": 1, **args}
    trained = {}
    for weight in (0.0, 0.5):
        spec = {**base, "hint": {"weight": weight, "components": 8, "stage": 2}}
        torch.manual_seed(13)
        trained[weight] = fit(build_model(spec), crops, np.array([0.1, 0.5, 0.7, 0.9]), spec,
                              tmp_path / f"w{weight}.ckpt", "hint", hint=(views, rows))
    differ = any(not torch.equal(a, b) for a, b in zip(trained[0.0].parameters(),
                                                       trained[0.5].parameters(), strict=True))
    assert differ, "the hint changed no weight"
    student = trained[0.5]
    assert not any(m._forward_hooks for m in student.modules())
    assert set(student.state_dict()) == set(build_model(base).state_dict())
    with pytest.raises(ValueError, match="no trunk views"):
        spec = {**base, "hint": {"weight": 0.5, "components": 8}}
        fit(build_model(spec), crops, np.zeros(4), spec, tmp_path / "x.ckpt", "hint")


def test_video_frames_keeps_every_step_th_frame_and_refuses_a_non_video(tmp_path):
    import cv2
    from fiqa_gate_training.sources import video_frames

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 48))
    for i in range(30):  # each frame's grey level is its index, so frames can be told apart
        writer.write(np.full((48, 64, 3), 8 * i, np.uint8))
    writer.release()
    out = tmp_path / "frames"
    out.mkdir()
    got = video_frames(video, out, step=12)
    assert [p.name for p in got] == ["clip_0000.png", "clip_0012.png", "clip_0024.png"]
    levels = [float(cv2.imread(str(p)).mean()) for p in got]
    assert levels == pytest.approx([0, 96, 192], abs=6)

    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="not a video"):
        video_frames(fake, out)


def test_model_card_names_every_built_in_unlabelled_source():
    from fiqa_gate_training.sources import SOURCE_NAMES, SOURCES

    assert set(SOURCE_NAMES) == set(SOURCES)


def test_a_stage_without_its_inputs_or_a_file_as_out_is_a_usage_error(tmp_path):
    cmd = [sys.executable, "-m", "fiqa_gate", "train", "run", "smoke"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "run"), "--stage", "calibrate"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "stage calibrate reads the output of stage data, student" in done.stderr
    # a stage the config skips is not done either: its readers still need it
    from fiqa_gate_training.recipe import CONFIG_DIR

    cfg = json.loads((CONFIG_DIR / "smoke.json").read_text())
    cfg["skip_stages"] = ["data", "report"]
    (tmp_path / "skip.json").write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "train", "run",
                           str(tmp_path / "skip.json"), "--out", str(tmp_path / "skip"),
                           "--stage", "teacher"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "reads the output of stage data" in done.stderr
    assert "skip_stages leaves out data (--stage data runs it)" in done.stderr
    # and a stage named with --stage runs though the config skips it (the report had been
    # skipped without a word, and editing the config made it another run's; audit 2026-12-08)
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "train", "run",
                           str(tmp_path / "skip.json"), "--out", str(tmp_path / "skip"),
                           "--stage", "data"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "stage data: done in" in done.stderr, done.stderr[-2000:]
    (tmp_path / "file").write_text("mine")
    done = subprocess.run([*cmd, "--out", str(tmp_path / "file")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 2 and "is a file" in done.stderr
    assert (tmp_path / "file").read_text() == "mine"


def test_unlabelled_pictures_left_out_are_named_and_none_at_all_is_refused(tmp_path):
    """A folder of unlabelled pictures none of which gave a face had been accepted without
    a word, and self-training ran on nothing (training audit of 2026-12-08)."""
    from fiqa_gate_training.recipe import CONFIG_DIR

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    Image.new("RGB", (200, 160), (120, 160, 90)).save(folder / "grass.png")
    (folder / "empty.jpg").write_bytes(b"")
    cfg = json.loads((CONFIG_DIR / "smoke.json").read_text())
    cfg["data"]["unlabelled"] = [str(folder)]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "train", "run",
                           str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"),
                           "--stage", "data"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "2 of 2 unlabelled images left out" in done.stderr and "grass.png: no face" in \
        done.stderr, done.stderr[-2000:]
    assert "self-training needs faces in each" in done.stderr, done.stderr[-2000:]


# Config checks (training/config.py): broken copies of smoke.json, checked directly (fast).

_DELETE = object()  # in `_broken_smoke`'s changes: remove the key


def _config_dir():
    from pathlib import Path

    from fiqa_gate_training import config

    return Path(config.__file__).parent / "configs"


def _broken_smoke(tmp_path, changes):
    """smoke.json with `changes` (dotted key -> new value, or _DELETE), written to
    tmp_path/smoke_bad.json and read back from there as a config file is."""
    cfg = json.loads((_config_dir() / "smoke.json").read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    path = tmp_path / "smoke_bad.json"
    path.write_text(json.dumps(cfg))
    return json.loads(path.read_text()), path.name


def test_config_check_accepts_the_built_in_configs_and_what_the_code_allows(tmp_path):
    from fiqa_gate_training.config import ACTIVATIONS, check_config
    from fiqa_gate_training.models import ACTIVATIONS as BUILT

    assert set(ACTIVATIONS) == set(BUILT)  # the check's copy of the models' choices
    paths = sorted(_config_dir().glob("*.json"))
    assert {p.stem for p in paths} >= {"cpu", "paper", "smoke"}
    for path in paths:
        check_config(json.loads(path.read_text()), path.name)
    # a JSON integer where a number is expected; the other forms and options the code reads
    check_config(*_broken_smoke(tmp_path, {
        "student.lr": 1, "data.temperature": 1, "data.labelled": "identity:/faces",
        "data.mos_csv": "mos.csv", "data.mos_root": "/faces", "student.targets": "labels",
        "data.memory_check": False, "data.detector": "yunet", "student.hint.set_b": True,
        "student.schedule": "step", "student.decay_epochs": 10, "student.decay_ratio": 0.1,
        "student.backbone_args": {"depths": [3, 3, 9, 3]}, "skip_stages": [],
        "input_size_ablation": {"sizes": [112, 352], "epochs": 1, "max_faces": 10,
                                "seeds": [13, 14]}}))
    # the last stage counted from the end; timm's prefixes for weights on disk or a hub
    # (a folder that exists; the hint is not checked against a net only its stage reads)
    check_config(*_broken_smoke(tmp_path, {"student.hint.stage": -1}))
    check_config(*_broken_smoke(tmp_path, {"student.backbone": f"local-dir:{tmp_path}",
                                           "teacher.backbone": "hf-hub:timm/x"}))


@pytest.mark.parametrize("changes,message", [
    ({"student.epocs": 1},
     "smoke_bad.json: student.epocs: unknown key (did you mean student.epochs?)"),
    ({"studnet": {}}, "smoke_bad.json: studnet: unknown key (did you mean student?)"),
    ({"student.hint.wieght": 1.0},
     "student.hint.wieght: unknown key (did you mean student.hint.weight?)"),
    ({"student.lr": _DELETE}, "smoke_bad.json: student.lr: missing (required: a number)"),
    ({"data": _DELETE}, "smoke_bad.json: data: missing (required: an object)"),
    ({"student.hint.components": _DELETE}, "student.hint.components: missing"),
    ({"input_size_ablation": {"sizes": [112], "epochs": 1}},
     "input_size_ablation.max_faces: missing"),
    ({"data.variants": "two"},
     "smoke_bad.json: data.variants: expected an integer, got a string ('two')"),
    ({"student.epochs": "1"}, "student.epochs: expected an integer, got a string ('1')"),
    ({"student.epochs": 1.5}, "student.epochs: expected an integer, got a number (1.5)"),
    ({"teacher.epochs": True}, "teacher.epochs: expected an integer, got true"),
    ({"student.lr": "2e-3"}, "student.lr: expected a number, got a string"),
    ({"student.select_on_val": 1}, "student.select_on_val: expected true or false"),
    ({"student.hint": None}, "student.hint: expected an object, got null"),
    ({"data.train_identities": "s1"},
     "data.train_identities: expected a list of strings, got a string ('s1')"),
    ({"data.val_identities": ["s25", 26]}, "data.val_identities[1]: expected a string"),
    ({"skip_stages": ["reprot"]}, "skip_stages[0]: 'reprot' is not one of data, teacher"),
    ({"skip_stages": "report"}, "skip_stages: expected a list of strings"),
    ({"student.schedule": "cos"},
     "student.schedule: 'cos' is not one of cosine, step (did you mean cosine?)"),
    ({"student.targets": "teacher"},
     "student.targets: 'teacher' is not one of labels, enhanced"),
    ({"student.activation": "silu"}, "student.activation: 'silu' is not one of gelu, relu"),
    ({"student.quantize": "fp16"}, "student.quantize: 'fp16' is not one of int8"),
    ({"data.labelled": "lfw"}, "data.labelled: 'lfw' is not one of orl, identity:/path"),
    ({"data.labelled": "identity:"}, "data.labelled: 'identity:' is not one of"),
    ({"data.b_extra_kinds": ["sepia"]}, "data.b_extra_kinds[0]: 'sepia' is not one of"),
    ({"student.schedule": "step", "student.decay_ratio": 0.1},
     "student.decay_epochs: missing (required with schedule 'step')"),
    ({"teacher.freeze": _DELETE}, "student.hint: needs teacher.freeze > 0"),
    ({"data.mos_csv": "mos.csv"},
     "student.targets: 'enhanced' cannot be used with data.mos_csv"),
    # right type, wrong value: -3 epochs had exported an untrained student with exit 0, a
    # batch of 0 divided by zero and a misspelt backbone failed when its stage began
    ({"teacher.epochs": -3}, "teacher.epochs: -3 is out of range (it must be at least 1)"),
    ({"student.epochs": 0}, "student.epochs: 0 is out of range (it must be at least 1)"),
    ({"student.batch_size": 0}, "student.batch_size: 0 is out of range"),
    ({"data.temperature": 0}, "data.temperature: 0 is out of range (it must be above 0)"),
    ({"student.ema": 1.5}, "student.ema: 1.5 is out of range (it must be at least 0 and "
                           "below 1)"),
    ({"student.lr": float("nan")}, "student.lr: nan is out of range (it must be above 0)"),
    ({"student.hint.components": 0}, "student.hint.components: 0 is out of range"),
    ({"student.backbone": "foo:bar"}, "student.backbone: 'foo:bar' is neither 'sface' nor"),
    ({"input_size_ablation": {"sizes": [0], "epochs": 1, "max_faces": 10}},
     "input_size_ablation.sizes: [0] is out of range"),
    ({"student.backbone": "edgenext_xx_smal"},
     "student.backbone: 'edgenext_xx_smal' is neither 'sface' nor a timm model (did you "
     "mean edgenext_xx_small?)"),
    # found when the student stage began, after the teachers (audit of 2026-12-07)
    ({"student.hint.stage": 4}, "student.hint.stage: 4 is out of range (edgenext_xx_small "
                                "has 4 stages: 0 to 3, or -1 for the last)"),
    ({"student.hint.stage": -5}, "student.hint.stage: -5 is out of range"),
    ({"student.backbone_args": {"depthz": [1]}},
     "student: its backbone cannot take a hint: TypeError:"),
    ({"student.backbone": "vit_tiny_patch16_224", "student.timm_img_size": True},
     "student: its backbone cannot take a hint: "),  # its blocks are no stages of maps
    ({"student.backbone": "local-dir:"}, "student.backbone: 'local-dir:' names no folder"),
    ({"student.backbone": "local-dir:/no/such/folder"},
     "student.backbone: 'local-dir:/no/such/folder' names no folder"),
    ({"teacher.backbone": "hf-hub: "}, "teacher.backbone: 'hf-hub: ' names no model"),
])
def test_config_check_names_the_file_and_key_of_each_mistake(tmp_path, changes, message):
    from fiqa_gate_training.config import check_config

    with pytest.raises(ValueError) as err:
        check_config(*_broken_smoke(tmp_path, changes))
    assert message in str(err.value)
    assert str(err.value).startswith("smoke_bad.json: ") and "\n" not in str(err.value)


def test_config_check_refuses_a_top_level_that_is_not_an_object():
    import re

    from fiqa_gate_training.config import check_config

    for value, got in (([], "a list"), ("smoke", "a string ('smoke')"), (None, "null")):
        with pytest.raises(ValueError, match=r"^x\.json: the top level must be a JSON "
                                             rf"object, not {re.escape(got)}$"):
            check_config(value, "x.json")


def test_config_check_reports_every_problem_at_once(tmp_path):
    from fiqa_gate_training.config import check_config

    with pytest.raises(ValueError) as err:
        check_config(*_broken_smoke(tmp_path, {
            "student.epocs": 1, "studnet": {}, "data.variants": "two", "teacher.lr": _DELETE,
            "skip_stages": ["reprot"]}))
    lines = str(err.value).splitlines()
    assert len(lines) == 5 and all(line.startswith("smoke_bad.json: ") for line in lines)
    for key in ("student.epocs", "studnet", "data.variants", "teacher.lr", "skip_stages[0]"):
        assert any(f": {key}: " in line for line in lines), key


def test_an_identity_folder_too_small_to_split_is_refused_before_any_work(tmp_path, orl_root):
    # three people give validation (a fifth, by name) too few identities for impostor
    # pairs: said at once, not as a ValueError from the EDC after detection
    folder = orl_people(tmp_path / "people", orl_root, ("s1", "s2", "s3"))
    cfg, _ = _broken_smoke(tmp_path, {"data.labelled": f"identity:{folder}",
                                      "data.train_identities": _DELETE,
                                      "data.val_identities": _DELETE})
    config = tmp_path / "small.json"
    config.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "train", "run", str(config),
                           "--out", str(tmp_path / "run"), "--stage", "data"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "has 3 identities, of which" in done.stderr and "Traceback" not in done.stderr
    # identities named in the config must be the folder's (smoke.json names ORL's s25)
    cfg["data"]["val_identities"] = ["s3", "s25"]
    config.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "train", "run", str(config),
                           "--out", str(tmp_path / "run2"), "--stage", "data"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and f"identities not in {folder}: s25" in done.stderr


def test_an_identity_folder_s_split_follows_the_identities_the_config_names():
    import unicodedata

    from fiqa_gate_training.data import _split_identities

    from fiqa_gate.errors import FiqaGateError

    names = [f"p{i}" for i in range(20)]
    train, by_hash = _split_identities({}, names, "people")
    assert 1 <= len(by_hash) < 10 and by_hash <= set(names)  # about a fifth
    assert train == set(names) - by_hash
    assert _split_identities({"val_identities": ["p1", "p2"]}, names, "people")[1] == {
        "p1", "p2"}
    assert _split_identities({"train_identities": names[2:]}, names, "people") == (
        set(names[2:]), {"p0", "p1"})
    with pytest.raises(FiqaGateError, match="both in train_identities and in val"):
        _split_identities({"train_identities": ["p1"], "val_identities": ["p1"]},
                          names, "people")
    with pytest.raises(FiqaGateError, match="identities not in people: s31"):
        _split_identities({"val_identities": ["p1", "s31"]}, names, "people")
    # folders named decomposed (macOS, some zip tools), the config composed: the same
    # people, spelt as the folders are; a near miss is pointed out (audit 2026-12-08)
    folders = [unicodedata.normalize("NFD", n) for n in ("José", "Zoë", "Ana María", "Bo")]
    assert _split_identities({"val_identities": ["José", "Zoë"]}, folders, "people") == (
        set(folders[2:]), set(folders[:2]))
    with pytest.raises(FiqaGateError, match="Ana Maria \\(did you mean 'Ana Mar"):
        _split_identities({"val_identities": ["Ana Maria"]}, folders, "people")
    # a name spelt exactly as a folder is that folder (third audit of 2026-12-08)
    assert _split_identities({"val_identities": [folders[0], "Zoë"]}, folders, "people")[1] \
        == set(folders[:2])


def test_a_users_mos_list_and_run_folder_are_checked_before_any_work(tmp_path):
    from fiqa_gate.datasets import read_mos_csv
    from fiqa_gate.errors import FiqaGateError

    mos = tmp_path / "mos.csv"
    mos.write_text("\ufeffimage_name,score\na.jpg,0.7\nb.jpg,0.2\n", encoding="utf-8")  # a BOM
    assert read_mos_csv(mos) == [(tmp_path / "a.jpg", 0.7), (tmp_path / "b.jpg", 0.2)]
    # a header in another case, or with spaces, is the same header (audit 2026-12-08)
    mos.write_text("Image_Name, Score\na.jpg,0.7\nb.jpg,0.2\n")
    assert read_mos_csv(mos) == [(tmp_path / "a.jpg", 0.7), (tmp_path / "b.jpg", 0.2)]
    mos.write_text("image_name,score,Score\na.jpg,0.7,3\n")  # which score?
    with pytest.raises(FiqaGateError, match="names a column twice"):
        read_mos_csv(mos)
    mos.write_text("file,mos\na.jpg,0.7\n")
    with pytest.raises(FiqaGateError, match="the first line holds 'file,mos'"):
        read_mos_csv(mos)
    mos.write_text("image_name,score\na.jpg,0.6\nb.jpg,0.1\na.jpg,0.8\n")
    got = read_mos_csv(mos)  # one face, one label: a repeated rating is averaged
    assert [p.name for p, _ in got] == ["a.jpg", "b.jpg"]
    assert got[0][1] == pytest.approx(0.7) and got[1][1] == 0.1
    # one score for every image (or one image) had labelled every face 0.0, the worst;
    # a Latin-1 file was a traceback after the labelled sets' detection (audit 2026-12-07)
    for text, says in (("image_name,score\na.jpg,nan\n", "bad score 'nan'"),
                       ("image_name,score\n", "no rows after the header"),
                       ("image_name,score\na.jpg,3\nb.jpg,3\n", "every image has the score 3"),
                       ("image_name,score\na.jpg,3\n", "every image has the score 3")):
        mos.write_text(text)
        with pytest.raises(FiqaGateError, match=says):
            read_mos_csv(mos)
    mos.write_bytes("image_name,score\ncaf\u00e9.jpg,0.3\nb.jpg,0.2\n".encode("latin-1"))
    with pytest.raises(FiqaGateError, match="not a UTF-8 text file"):
        read_mos_csv(mos)
    with pytest.raises(FiqaGateError, match="cannot read the MOS list"):
        read_mos_csv(tmp_path / "missing.csv")
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "train", "run", "smoke",
                           "--out", str(tmp_path / "a-file" / "run")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "cannot write a run there" in done.stderr
    assert "Traceback" not in done.stderr


def test_unlabelled_sources_that_give_nothing_are_named(tmp_path):
    from fiqa_gate_training.sources import unlabelled_images

    from fiqa_gate.errors import FiqaGateError

    with pytest.raises(FiqaGateError, match="did you mean 'installed'"):
        unlabelled_images(["instaled"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FiqaGateError, match="holds no images"):
        unlabelled_images([str(tmp_path / "empty")])


def test_a_short_training_run_schedules_without_dividing_by_zero():
    # ten optimisation steps made torch's one-cycle warm-up one step long (a ZeroDivision)
    import torch
    from fiqa_gate_training.train import schedule

    for total in range(1, 25):
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = schedule(opt, {"lr": 1e-3}, epochs=total, steps_per_epoch=1)
        for _ in range(total):
            opt.step()
            sched.step()
        assert all(g["lr"] >= 0 for g in opt.param_groups)


def test_the_model_card_describes_the_data_and_models_the_run_used():
    from fiqa_gate_training.report import _labelled_line, _span

    assert _span([f"s{i}" for i in range(1, 25)]) == "s1-s24"
    assert _span(["s1", "s3"]) == "s1, s3"
    orl = _labelled_line({"labelled": "orl", "recognizer": "sface"})
    assert "identities s1-s24 for training, s25-s30 for calibration" in orl
    assert "SFace (OpenCV Zoo, Apache-2.0)" in orl
    own = _labelled_line({"labelled": "identity:/data/casia", "recognizer": "dlib",
                          "mos_csv": "mos.csv"})
    assert "`/data/casia`" in own and "ORL faces" not in own and "mos.csv" in own
    assert "dlib's ResNet" in own and "SFace" not in own


def test_a_run_s_state_files_are_whole_or_said_damaged(tmp_path, caplog):
    # a full disk had left config.json or stage_times.json empty, and every resume then
    # stopped with a JSONDecodeError traceback; torch's own error on a full disk was a
    # traceback too, with its torn temporary file left behind (audit of 2026-12-07)
    from pathlib import Path

    from fiqa_gate_training.recipe import RecipeError, Run
    from fiqa_gate_training.train import save_whole

    cfg = {"name": "x"}
    run = Run(cfg, tmp_path / "run")
    run.timed("data", lambda: None)
    (tmp_path / "run" / "stage_times.json").write_text('{"data": 1')  # cut short
    with caplog.at_level("WARNING"):
        again = Run(cfg, tmp_path / "run")
    assert again.times == {} and "stage_times.json is damaged" in caplog.text
    (tmp_path / "run" / "config.json").write_text("")
    with pytest.raises(RecipeError, match=r"config\.json is damaged, so which config made "
                                          r"this run is unknown; delete it"):
        Run(cfg, tmp_path / "run")

    def torn(name: str) -> None:
        Path(name).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    target = tmp_path / "views.pt"
    with pytest.raises(OSError, match=r"cannot write .*views\.pt \(RuntimeError: \[enforce"):
        save_whole(torn, target)
    assert not target.exists() and not target.with_suffix(".tmp").exists()
    save_whole(lambda name: Path(name).write_bytes(b"whole"), target)
    assert target.read_bytes() == b"whole"


def test_people_with_one_picture_are_left_out_of_labelling(caplog):
    # most LFW identities have one picture: they crashed the data stage after all the
    # detection and embedding ("some faces have no clean reference")
    from fiqa_gate_training.data import with_references

    from fiqa_gate.datasets import SourceFace

    faces = [SourceFace(np.zeros((4, 4, 3), np.uint8), None, f"{who}/{i}", who)
             for who, n in (("ann", 2), ("bob", 1), ("cy", 3)) for i in range(n)]
    skipped: list[tuple[str, str]] = []
    with caplog.at_level("WARNING"):
        kept = with_references(faces, "labelled_train", skipped)
    assert [f.source for f in kept] == ["ann/0", "ann/1", "cy/0", "cy/1", "cy/2"]
    assert skipped == [("bob/0", "the only picture of bob with a face: no other to label "
                        "it against")]  # labels.json lists them
    assert "1 identities of the labelled_train set left out, each with one picture" \
        in caplog.text and caplog.text.rstrip().endswith("bob")


def test_a_second_run_in_one_process_logs_only_to_its_own_folder(tmp_path):
    # each run had added its handlers for good: a second run's lines, and any warning
    # long after, went to every earlier run's train.log (audit of 2026-12-07)
    import logging

    from fiqa_gate_training.cli import _log_to

    runtime, training = logging.getLogger("fiqa_gate"), logging.getLogger("fiqa_gate.training")
    before = (len(runtime.handlers), len(training.handlers))
    try:
        _log_to(tmp_path / "one")
        training.info("a line of run 1")
        _log_to(tmp_path / "two")
        training.info("a line of run 2")
        runtime.warning("a runtime warning during run 2")
        level = runtime.level
        runtime.setLevel(logging.DEBUG)  # as -vv sets it: its info is for stderr only
        runtime.info("a runtime info line")
        runtime.setLevel(level)
        assert (len(runtime.handlers), len(training.handlers)) == (before[0] + 1,
                                                                  before[1] + 2)
        one = (tmp_path / "one" / "train.log").read_text()
        two = (tmp_path / "two" / "train.log").read_text()
        assert "run 1" in one and "run 2" not in one
        assert "a line of run 2" in two and "a runtime warning during run 2" in two
        assert "a runtime info line" not in two
    finally:
        from fiqa_gate_training import cli as training_cli

        for logger, handler in training_cli._ours:
            logger.removeHandler(handler)
            handler.close()
        training_cli._ours.clear()


def test_data_paths_starting_with_a_tilde_are_the_users_and_an_empty_one_is_refused(
        tmp_path, monkeypatch, orl_root):
    # `~/faces` was "not a folder" and "" read the working folder (audit 2026-12-08)
    from fiqa_gate_training.sources import unlabelled_images

    from fiqa_gate.errors import FiqaGateError

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "faces").mkdir()
    shutil.copy(orl_root / "s1" / "1.pgm", tmp_path / "faces" / "a.pgm")
    assert unlabelled_images(["~/faces"]) == [tmp_path / "faces" / "a.pgm"]
    with pytest.raises(FiqaGateError, match="an empty name"):
        unlabelled_images([""])


def test_a_rerun_says_when_the_users_data_changed_since_the_data_stage(tmp_path, orl_root):
    # the data stage is not redone, so an edited folder was used as it had been, without
    # a word (training audit of 2026-12-08)
    folder = orl_people(tmp_path / "people", orl_root, ("s1", "s2", "s3", "s4"))
    cfg, _ = _broken_smoke(tmp_path, {"data.labelled": f"identity:{folder}",
                                      "data.train_identities": ["s1", "s2"],
                                      "data.val_identities": ["s3", "s4"]})
    config = tmp_path / "own.json"
    config.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "fiqa_gate", "train", "run", str(config), "--out",
           str(tmp_path / "run"), "--stage", "data"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert "stage data: done already" in done.stderr and "changed since" not in done.stderr
    (folder / "s2" / "2.pgm").unlink()
    # said whichever stage is asked for (this one then stops: it needs the teacher)
    done = subprocess.run([*cmd[:-1], "pseudo_a"], capture_output=True, text=True,
                          timeout=600)
    assert "changed since the data stage read it (8 files then, 7 now" in done.stderr, \
        done.stderr[-2000:]


def test_mos_images_that_are_validation_or_test_pictures_are_warned_about(tmp_path, orl_root,
                                                                          caplog):
    # a MOS list of validation pictures leaked into model selection and calibration
    # without a word (training audit of 2026-12-08); copies are found by their bytes
    from fiqa_gate_training.data import _warn_held_out

    mos = [tmp_path / "a.pgm", tmp_path / "b.pgm", tmp_path / "c.pgm"]
    for path, source in zip(mos, ("s25/1.pgm", "s31/2.pgm", "s5/1.pgm"), strict=True):
        shutil.copy(orl_root / source, path)
    val = [orl_root / "s25" / f"{i}.pgm" for i in range(1, 11)]
    with caplog.at_level(logging.WARNING, logger="fiqa_gate.training"):
        _warn_held_out("mos.csv", mos, val)
    text = caplog.text
    assert "1 images are also validation pictures" in text and "a.pgm" in text
    assert "1 images are also test split (ORL s31-s40) pictures" in text and "b.pgm" in text
    assert "c.pgm" not in text
