"""`fiqa-gate evaluate` and `bench` on the real test split, models and FAISS gallery."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import orl_people
from PIL import Image

from fiqa_gate import degradations, registry
from fiqa_gate.evaluation.identification import split
from fiqa_gate.evaluation.protocol import (
    in_chunks,
    load_test_set,
    qualities,
    verification_pairs,
)
from fiqa_gate.images import load_image
from fiqa_gate.registry import get_detector, get_recognizer


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fiqa_gate", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_degradation_draws_do_not_depend_on_where_the_faces_live(tmp_path, orl_root):
    # ORL sits under site-packages: a draw keyed on the full path would differ per checkout
    copies = [tmp_path / "a", tmp_path / "b" / "deeper"]
    for root in copies:
        (root / "s31").mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(orl_root / "s31" / f"{i}.pgm", root / "s31" / f"{i}.pgm")
    detector = get_detector()
    one, two = (load_test_set(detector, root=r, variants=2, seed=9) for r in copies)
    assert one.source != two.source  # full paths still tell the sources apart
    assert one.records == two.records and np.array_equal(one.crops, two.crops)
    other = load_test_set(detector, root=copies[0], variants=2, seed=10)
    assert other.records != one.records


def test_a_detector_failing_on_one_picture_skips_that_picture(orl_root, tmp_path):
    """A detector plugin that raises on one picture (YuNet did on a 26000x8 strip) costs
    that picture, with its reason, not the evaluation."""
    from fiqa_gate.datasets import detect_sources

    yunet = get_detector()

    class Fussy:  # the real detector, except on one image size
        def detect(self, image: np.ndarray) -> list:
            if image.shape[1] == 201:
                raise RuntimeError("OpenCV(5.0.0) error:\n(-215:Assertion failed)")
            return yunet.detect(image)

    odd = tmp_path / "odd.png"
    Image.open(orl_root / "s31" / "2.pgm").resize((201, 240)).save(odd)
    items = [("s31", orl_root / "s31" / "1.pgm"), ("s31", odd), ("s31", orl_root / "s31" / "3.pgm")]
    skipped: list[tuple[str, str]] = []
    found = detect_sources(items, Fussy(), skipped=skipped)
    assert [f.source for f in found] == [str(items[0][1]), str(items[2][1])]
    assert skipped == [(str(odd), "detector failed: RuntimeError: OpenCV(5.0.0) error: "
                                  "(-215:Assertion failed)")]


def test_group_photo_faces_are_degraded_in_a_window_that_changes_no_crop(sample_photo):
    from fiqa_gate.datasets import detect_sources, face_window
    from fiqa_gate.faces import align_face

    detector = get_detector()
    full = load_image(str(sample_photo))
    faces = detector.detect(full)
    assert len(detect_sources([(None, sample_photo)], detector, all_faces=True)) == len(faces)
    assert len(faces) >= 5
    for det in faces:
        window, moved = face_window(full, det)
        assert window.size < full.size / 3  # each face keeps its surroundings only
        lm = np.asarray(det.landmarks, np.float64).reshape(5, 2)
        assert np.abs(align_face(window, moved.landmarks).astype(int)
                      - align_face(full, lm)).max() <= 1  # the warp's fixed-point rounding
        # the strongest misalignment and the longest blur see only what the window holds
        scale = float(np.linalg.norm(lm[1] - lm[0])) / degradations.TEMPLATE_EYE_DISTANCE
        record = [{"kind": "misalign", "rotation": 40.0, "scale": 0.64,
                   "shift": [-22.0 * scale, 22.0 * scale]},
                  {"kind": "motion", "length": 22.0 * scale, "angle": 30.0}]
        one = degradations.apply(window, moved.landmarks, record)
        two = degradations.apply(full, lm, record)
        assert np.abs(align_face(one.image, one.landmarks).astype(int)
                      - align_face(two.image, two.landmarks)).max() <= 1


def test_evaluate_reuses_its_embedding_norms_for_the_norm_baseline(tmp_path, orl_root):
    # 300 faces: the chunks of 256 that evaluate embeds and scores in, plus a partial one
    (tmp_path / "s31").mkdir()
    for i in range(1, 11):
        shutil.copy(orl_root / "s31" / f"{i}.pgm", tmp_path / "s31" / f"{i}.pgm")
    samples = load_test_set(get_detector(), root=tmp_path, variants=29, seed=5)
    assert len(samples) == 300
    recognizer = get_recognizer("sface")
    emb, norms = in_chunks(recognizer.embed_with_norms, samples.crops)
    assert emb.shape == (300, 128) and norms.shape == (300,)
    own, _ = qualities(samples, ["embedding-norm"], "sface")  # the scorer's own pass
    given, calibrated = qualities(samples, ["embedding-norm"], "sface", norms=norms)
    assert np.array_equal(own["embedding-norm"], given["embedding-norm"])
    assert "embedding-norm" in calibrated and norms.std() > 0


def test_held_out_degradations_are_new_seeded_and_harsher_with_severity(orl_root):
    # The held-out protocol asks about damage no recipe trains on: it must be new,
    # reproducible, and its severity must mean something.
    from fiqa_gate.datasets import build_samples, detect_sources, orl_items
    from fiqa_gate.faces import align_face

    assert not set(degradations.HELD_OUT_KINDS) & set(degradations.KINDS)
    assert not set(degradations.EXTRA_KINDS) & set(degradations.KINDS + degradations.HELD_OUT_KINDS)
    detector = get_detector()
    face = detect_sources(orl_items(["s31"])[:1], detector)[0]
    lm = np.asarray(face.detection.landmarks, np.float64).reshape(5, 2)
    clean = align_face(face.image, lm).astype(float)

    def damage(kind: str, severity: float) -> float:
        params = degradations.draw(kind, severity, np.random.default_rng(3), lm)
        assert params == degradations.draw(kind, severity, np.random.default_rng(3), lm)
        one = degradations.apply(face.image, lm, [json.loads(json.dumps(params))])
        two = degradations.apply(face.image, lm, [params])
        assert np.array_equal(one.image, two.image)
        return float(np.abs(align_face(one.image, one.landmarks) - clean).mean())

    for kind in degradations.HELD_OUT_KINDS:
        mild, harsh = damage(kind, 0.0), damage(kind, 1.0)
        assert 1.0 < mild < harsh, (kind, mild, harsh)
    drawn = build_samples([face], detector, variants=12, seed=1, include_clean=False,
                          kinds=degradations.HELD_OUT_KINDS, redetect=False)
    used = {step["kind"] for record in drawn.records for step in record}
    assert used <= set(degradations.HELD_OUT_KINDS) and len(used) >= 4


def test_protocol_compares_faces_with_clean_references_of_other_images():
    identity = ["A", "A", "A", "B", "B"]
    source = ["a1", "a1", "a2", "b1", "b2"]
    clean = [True, False, True, True, True]
    a, b, mated = verification_pairs(identity, source, clean)
    pairs = {(int(x), int(y)) for x, y in zip(a, b, strict=True)}
    # every reference is clean, no pair shares a source, clean-clean pairs appear once
    assert all(clean[y] for _, y in pairs)
    assert all(source[x] != source[y] for x, y in pairs)
    assert (1, 2) in pairs and (1, 0) not in pairs
    assert not ((0, 2) in pairs and (2, 0) in pairs)
    assert len(pairs) == len(a)
    assert mated.tolist() == [identity[x] == identity[y] for x, y in zip(a, b, strict=True)]


def _every_pair(identity, source, clean):
    """The protocol's comparisons, listed the slow, obvious way."""
    return [(x, y, identity[x] == identity[y]) for x in range(len(identity))
            for y in range(len(identity))
            if clean[y] and source[x] != source[y] and not (clean[x] and x > y)]


def test_protocol_samples_uniformly_past_max_pairs():
    rng = np.random.default_rng(3)
    people = rng.choice(6, 60, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])  # unequal identities
    identity = [f"p{people[i // 4]}" for i in range(240)]
    source = [f"{identity[i]}/{i // 4}" for i in range(240)]  # 4 faces per image
    clean = [i % 4 == 0 for i in range(240)]
    every = _every_pair(identity, source, clean)
    a, b, mated = verification_pairs(identity, source, clean)  # few: all of them, in order
    assert list(zip(a.tolist(), b.tolist(), mated.tolist(), strict=True)) == every

    n_mated = sum(m for *_, m in every)
    assert n_mated > 4 * 60 and len(every) - n_mated > 4 * 60  # both kinds get sampled
    allowed = {(x, y): m for x, y, m in every}
    hits: dict[tuple[int, int], int] = {}
    for seed in range(100):
        a, b, mated = verification_pairs(identity, source, clean, max_pairs=60, seed=seed)
        assert mated.sum() == 60 and (~mated).sum() == 60
        assert np.all(np.diff(a * 240 + b) > 0)  # distinct, in order of a then b
        for x, y, m in zip(a.tolist(), b.tolist(), mated.tolist(), strict=True):
            assert allowed[(x, y)] == m
            hits[(x, y)] = hits.get((x, y), 0) + 1
    again = verification_pairs(identity, source, clean, max_pairs=60, seed=99)
    assert np.array_equal(again[0], a) and np.array_equal(again[1], b)
    # uniform: each mated pair is drawn 100 * 60 / n_mated times on average, none far off
    mated_hits = np.array([hits.get((x, y), 0) for x, y, m in every if m])
    expected = 100 * 60 / n_mated
    assert abs(mated_hits.mean() - expected) < 1e-9
    assert mated_hits.std() < 1.5 * np.sqrt(expected)


def test_identification_split_keeps_probes_apart_from_candidates():
    from fiqa_gate.datasets import Samples

    ident = [f"s{i}" for i in range(10) for _ in range(8)]
    source = [f"s{i}/{j // 2}" for i in range(10) for j in range(8)]
    s = Samples(np.zeros((80, 1, 1, 3), np.uint8), ident, source, [[]] * 80, np.ones(80))
    sp = split(s)
    assert not set(sp.candidates) & set(sp.mated_probes)
    enrolled = {ident[i] for i in sp.candidates}
    assert enrolled == {ident[i] for i in sp.mated_probes}
    assert not enrolled & {ident[i] for i in sp.nonmated_probes}
    for i in sp.mated_probes:
        assert source[i] not in {source[j] for j in sp.candidates}


def test_identification_best_of_n_gain_and_its_interval_through_faiss():
    """Six people, four pictures each, a clean and a damaged face per picture; a damaged
    face's embedding points nowhere. Picking the clean candidate (quality 1) enrolls every
    identity right; a random pick enrolls a useless face about half the time."""
    from fiqa_gate.datasets import Samples
    from fiqa_gate.evaluation.identification import identification

    rng = np.random.default_rng(2)
    people = np.eye(6, 16)
    ident, source, emb, quality = [], [], [], []
    for p in range(6):
        for pic in range(4):
            for damaged in (False, True):
                ident.append(f"p{p}")
                source.append(f"p{p}/{pic}")
                noise = rng.normal(0, 0.05, 16)
                emb.append(rng.normal(0, 1, 16) if damaged and pic < 2 else people[p] + noise)
                quality.append(0.0 if damaged else 1.0)
    emb = np.asarray(emb, np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = np.asarray(quality)
    s = Samples(np.zeros((len(q), 1, 1, 3), np.uint8), ident, source, [[]] * len(q),
                np.ones(len(q)))
    # scored by: the truth, its reverse (always the damaged face), and a copy of the truth
    picks = {"quality": q, "reversed": 1 - q, "copy": q.copy()}
    out = identification(s, emb, "sface", 0.3, picks, {"quality": q}, bootstrap=200)
    best, rand = out["best_of_n"]["quality"], out["best_of_n"]["random"]
    assert out["mated_probes"] == 4 * 2 * 2 and out["bootstrap"]["resamples"] == 200
    assert best["rank1"] == 1.0 and best["rank1_ci95"] == [1.0, 1.0]
    assert 0.2 < rand["rank1"] < 0.9
    lo, hi = best["rank1_gain_ci95"]
    assert 0 < lo <= best["rank1"] - rand["rank1"] <= hi and best["ahead"] == 1.0
    gated = out["gated"]["quality"]  # only clean candidates enrolled: no wrong neighbours
    assert gated["enrolled"] == 4 * 2 and gated["rank1"] == 1.0
    assert gated["rank1"] - out["ungated"]["rank1"] >= gated["rank1_gain_ci95"][0]
    assert "rank1_gain_ci95" not in out["ungated"] and "ahead" not in rand
    paired = {d["scorer"]: d for d in out["best_of_n_paired"]["against"]}
    assert out["best_of_n_paired"]["first"] == "quality" and set(paired) == {"reversed", "copy"}
    rev = paired["reversed"]
    assert rev["difference"] == 1.0 - out["best_of_n"]["reversed"]["rank1"] > 0.5
    assert 0 < rev["ci95"][0] <= rev["difference"] <= rev["ci95"][1] and rev["ahead"] == 1.0
    # the same picks: a difference of exactly 0 in every resample, neither ahead nor behind
    assert paired["copy"]["ci95"] == [0.0, 0.0]
    assert paired["copy"]["ahead"] == paired["copy"]["behind"] == 0.0
    again = identification(s, emb, "sface", 0.3, {"quality": q}, {"quality": q}, bootstrap=0)
    assert again["best_of_n"]["quality"]["rank1"] == 1.0
    assert "bootstrap" not in again and "rank1_ci95" not in again["best_of_n"]["quality"]
    assert "best_of_n_paired" not in again


def test_evaluate_on_the_orl_test_split_writes_report_and_plots(tmp_path):
    out = tmp_path / "report"
    done = _cli("evaluate", "--scorer", "sharpness", "--scorer", "embedding-norm",
                "--scorer", "random", "--bootstrap", "10", "--variants", "1", "-o", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for name in ("edc.png", "scores.png", "report.md"):
        assert (out / name).stat().st_size > 1000
    assert report["versions"]["numpy"] == np.__version__  # the figures' packages
    v = report["verification"]
    assert v["fmr_target"] == 1e-3 and 0 < v["e0"] < 1
    rows = {r["scorer"]: r for r in v["scorers"]}
    assert set(rows) == {"sharpness", "embedding-norm", "random"}
    lo, hi = rows["embedding-norm"]["ci95_20"]
    assert lo <= rows["embedding-norm"]["pauc_norm_20"] <= hi
    # the recognizer's own embedding norm is a real signal on degraded faces
    assert rows["embedding-norm"]["pauc_norm_20"] < rows["random"]["pauc_norm_20"]
    ident = report["identification"]
    assert 0 <= ident["best_of_n"]["random"]["rank1"] <= 1
    assert "embedding-norm" in ident["best_of_n"]
    norm_pick = ident["best_of_n"]["embedding-norm"]
    lo, hi = norm_pick["rank1_gain_ci95"]
    assert lo <= norm_pick["rank1"] - ident["best_of_n"]["random"]["rank1"] <= hi
    assert ident["bootstrap"]["resamples"] == 10
    # the first scorer named picks against each other scorer's picks, on the same resamples
    picked = {d["scorer"]: d for d in ident["best_of_n_paired"]["against"]}
    assert ident["best_of_n_paired"]["first"] == "sharpness" and "embedding-norm" in picked
    d = picked["embedding-norm"]
    assert d["difference"] == pytest.approx(ident["best_of_n"]["sharpness"]["rank1"]
                                            - norm_pick["rank1"])
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    assert "Best-of-N, paired" in (out / "report.md").read_text()
    assert "sharpness" in done.stdout
    groups = {g["group"]: g for g in report["by_degradation"]}
    assert "clean" in groups and len(groups) >= 5
    assert sum(g["faces"] for g in groups.values()) == report["faces"]
    # clean faces match their references better than damaged faces on average
    assert groups["clean"]["mated_similarity"] > groups["combination"]["mated_similarity"]
    assert "## By degradation" in (md := (out / "report.md").read_text())
    paired = v["paired"]  # the first scorer named against each other one, resample by resample
    assert paired["first"] == "sharpness" and v["bootstrap"]["resamples"] == 10
    against = {d["scorer"]: d for d in paired["against"]}
    assert set(against) == {"embedding-norm", "random"}
    d = against["embedding-norm"]
    assert d["difference"] == pytest.approx(rows["sharpness"]["pauc_norm_20"]
                                            - rows["embedding-norm"]["pauc_norm_20"])
    assert d["ci95"][0] <= d["ci95"][1] and 0.0 <= d["ahead"] <= 1.0
    assert "| sharpness against | difference |" in md and "| embedding-norm | " in md
    assert "10 bootstrap resamples of the source pictures" in md
    assert "10 bootstrap resamples of the mated probes' source pictures" in md


def _strict_json(path: Path) -> dict:
    """A report as any JSON reader takes it: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_pairs_list_and_identity_folder(tmp_path, orl_root):
    folder = tmp_path / "people"
    rows = []
    for s in ("s31", "s32", "s33"):
        (folder / s).mkdir(parents=True)
        for i in range(1, 5):
            (folder / s / f"{i}.pgm").write_bytes((orl_root / s / f"{i}.pgm").read_bytes())
    paths = sorted(folder.rglob("*.pgm"))
    for x in paths:
        for y in paths:
            if x < y:
                rows.append([str(x), str(y), int(x.parent == y.parent)])
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as fh:
        csv.writer(fh).writerows([["path_a", "path_b", "mated"], *rows])
    done = _cli("evaluate", "--pairs", str(pairs), "--scorer", "sharpness", "-o",
                str(tmp_path / "p"))
    assert done.returncode == 0, done.stderr[-3000:]
    rep = _strict_json(tmp_path / "p" / "report.json")
    assert rep["verification"]["n_mated"] == 3 * 6
    assert rep["verification"]["n_nonmated"] == len(rows) - 18
    assert rep["verification"]["warning"]  # 48 impostor pairs cannot resolve FMR 1e-3
    # the ERC at the EDC's relaxed target, and saying so (it had stayed at 1e-3)
    assert rep["erc_fmr_target"] == rep["verification"]["fmr_target"] == 0.01
    assert "ERC, threshold recomputed at FMR 0.01" in (tmp_path / "p" / "report.md").read_text()
    assert set(rep["erc"]) == {"sharpness"} and (tmp_path / "p" / "scores.png").stat().st_size
    # bootstrapped, and null here, as strict JSON has it: every mated pair matches, so FNMR
    # is 0 and the normalised pAUC is undefined
    assert rep["verification"]["scorers"][0]["ci95_20"] == [None, None]
    assert rep["verification"]["bootstrap"]["undefined"] == 200  # and said so
    assert "200 left out, in which every mated pair matches" in \
        (tmp_path / "p" / "report.md").read_text()
    # an image with itself, and a pair listed again the other way round, are left out,
    # however the list spells the file: another path to it, or a hard link of it
    with pairs.open("a", newline="") as fh:
        x = Path(rows[1][0])
        other_spelling = str(x.parent / ".." / x.parent.name / x.name)
        hard_link = tmp_path / "same-file.pgm"
        os.link(paths[0], hard_link)
        y = Path(rows[2][1])
        os.link(y, tmp_path / "same-b.pgm")
        csv.writer(fh).writerows([[str(paths[0]), str(paths[0]), 1],
                                  [str(hard_link), str(paths[0]), 1],
                                  [rows[0][1], rows[0][0], rows[0][2]],
                                  [other_spelling, rows[1][1], rows[1][2]],
                                  [rows[2][0], str(tmp_path / "same-b.pgm"), rows[2][2]],
                                  [rows[3][1], rows[3][0], 1 - rows[3][2]]])
    done = _cli("evaluate", "--pairs", str(pairs), "--scorer", "sharpness", "--bootstrap",
                "0", "-o", str(tmp_path / "p2"))
    assert done.returncode == 0 and "2 pairs of an image with itself and 3 repeated" in \
        done.stderr
    assert "1 pairs listed both as mated and as non-mated left out" in done.stderr
    report = _strict_json(tmp_path / "p2" / "report.json")
    # counted in listings, so that they add up to what the list holds
    left_out = report["pairs"]["left_out"]
    assert left_out == {"same_image": 2, "repeated": 3, "mated_and_non_mated": 2,
                        "image_skipped": 0}
    assert sum(left_out.values()) + report["pairs"]["compared"] == report["pairs"]["listed"]
    again = report["verification"]
    assert rows[3][2] == 0 and (again["n_mated"], again["n_nonmated"]) == (18, len(rows) - 19)
    collapsed = tmp_path / "collapsed.csv"
    collapsed.write_text(f"{paths[0]},{hard_link},1\n{rows[3][0]},{rows[3][1]},0\n"
                         f"{rows[3][1]},{rows[3][0]},1\n")
    done = _cli("evaluate", "--pairs", str(collapsed), "-o", str(tmp_path / "p4"))
    assert done.returncode == 2 and "no pair of two different images left" in done.stderr
    done = _cli("evaluate", "--pairs", str(pairs), "--variants", "5", "-o",
                str(tmp_path / "p3"))
    assert done.returncode == 2 and "--variants apply to the identity protocol" in done.stderr
    # the same faces as an LFW tree (name/name_000i.jpg) with LFW's pairs.txt layout
    lfw = tmp_path / "lfw"
    for x in paths:
        name = f"Person_{x.parent.name}"
        (lfw / name).mkdir(parents=True, exist_ok=True)
        Image.open(x).convert("RGB").save(lfw / name / f"{name}_{int(x.stem):04d}.jpg")
    listing = ["2\t3", "Person_s31\t1\t2", "Person_s32\t1\t4", "Person_s33\t2\t3",
               "Person_s31\t1\tPerson_s32\t2", "Person_s32\t3\tPerson_s33\t4",
               "Person_s33\t1\tPerson_s31\t9"]  # image 9 does not exist
    (tmp_path / "pairs.txt").write_text("\n".join(listing) + "\n")
    done = _cli("evaluate", "--pairs", str(tmp_path / "pairs.txt"), "--data", str(lfw),
                "--scorer", "sharpness", "-o", str(tmp_path / "lfw_report"))
    assert done.returncode == 0, done.stderr[-3000:]
    rep = _strict_json(tmp_path / "lfw_report" / "report.json")
    assert rep["pairs"] == {"listed": 6, "compared": 5, "left_out": {
        "same_image": 0, "repeated": 0, "mated_and_non_mated": 0, "image_skipped": 1}}
    assert "Pairs list: 6 listed, 5 compared; left out: 1 with an image left out (below)." \
        in (tmp_path / "lfw_report" / "report.md").read_text()
    assert (rep["verification"]["n_mated"], rep["verification"]["n_nonmated"]) == (3, 2)
    assert list(rep["skipped_images"]) == [str(lfw / "Person_s31" / "Person_s31_0009.jpg")]
    md = (tmp_path / "lfw_report" / "report.md").read_text()
    assert "6 listed, 5 compared" in md and "1 image left out" in md
    assert "1 file left out" in done.stderr
    done = _cli("evaluate", "--pairs", str(tmp_path / "pairs.txt"), "-o", str(tmp_path / "x"))
    assert done.returncode != 0 and "--data LFW_ROOT" in done.stderr
    (folder / "s31" / "5.jpg").write_bytes(b"")  # a zero-byte file is left out, and said so
    done = _cli("evaluate", "--data", str(folder), "--variants", "1", "--bootstrap", "0",
                "--degradations", "held-out", "--scorer", "sharpness", "-o", str(tmp_path / "d"))
    assert done.returncode == 0, done.stderr[-3000:]
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert rep["faces"] == 12 * 2
    assert list(rep["skipped_images"]) == [str(folder / "s31" / "5.jpg")]
    assert "1 file left out" in done.stderr
    assert rep["degradation"]["kinds"] == list(degradations.HELD_OUT_KINDS)
    assert "| sharpness | " in (md := (tmp_path / "d" / "report.md").read_text())
    assert " | n/a | " in md and "n/a-n/a" not in md  # no interval without a bootstrap
    assert rep["verification"]["paired"] == {} and "Paired comparison" not in md


def test_demo_line_calls_a_lead_only_when_the_interval_excludes_zero():
    from fiqa_gate.evaluation.cli import _lead

    def line(lo, hi):
        return _lead("student", "embedding-norm",
                     {"scorer": "embedding-norm", "difference": (lo + hi) / 2, "ci95": [lo, hi]})

    assert line(-0.02, -0.001).endswith(": ahead)\n")
    assert line(0.001, 0.02).endswith(": behind)\n")
    assert "a tie" in line(-0.017, 0.010)
    assert _lead("student", "embedding-norm", None) == ""  # --bootstrap 0: nothing to say
    assert _lead("student", "x", {"difference": None, "ci95": [None, None]}) == ""


def test_demo_picks_line_reads_a_rank1_difference_the_other_way_round():
    """For rank-1, higher is better: a positive interval is a lead (for pAUC it is a loss)."""
    from fiqa_gate.evaluation.cli import _picks_line

    def line(lo, hi):
        return _picks_line("student", "embedding-norm",
                           {"difference": (lo + hi) / 2, "ci95": [lo, hi]})

    assert line(0.02, 0.1).endswith(": ahead)\n") and "+6.0 points" in line(0.02, 0.1)
    assert line(-0.1, -0.02).endswith(": behind)\n")
    assert "a tie" in line(-0.079, 0.021)
    assert _picks_line("student", "embedding-norm", None) == ""


def test_score_histograms_switch_to_log_bins_only_for_wide_positive_scores():
    from fiqa_gate.evaluation.report import histogram_bins

    wide = np.array([5.0, 40.0, 300.0, 17000.0])  # sharpness-like: four decades
    edges, log = histogram_bins(wide)
    assert log and edges[0] == 5.0 and edges[-1] >= 17000.0
    assert np.allclose(edges[1:] / edges[:-1], edges[1] / edges[0])  # equal ratios
    assert np.histogram(wide, edges)[0].sum() == 4
    for narrow in (np.array([0.2, 0.9, 1.1]), np.array([0.0, 5.0, 17000.0]),
                   np.array([-0.5, 1.0])):  # small span, a zero, a negative: linear
        edges, log = histogram_bins(narrow)
        assert not log and np.allclose(np.diff(edges), edges[1] - edges[0])
    assert histogram_bins(np.array([])) == (10, False)


def _evaluate(*args: str):
    """`fiqa-gate evaluate` in-process, stderr kept apart from stdout."""
    from click.testing import CliRunner

    from fiqa_gate.evaluation.cli import evaluate

    return CliRunner().invoke(evaluate, list(args))


@pytest.mark.parametrize(("args", "option"), [
    (["--variants", "-1"], "--variants"),  # crashed in datasets.py after detection
    (["--bootstrap", "-5"], "--bootstrap"),  # a traceback after detection and embedding
    (["--gate-threshold", "1.5"], "--gate-threshold"),
    (["--gate-threshold", "-0.1"], "--gate-threshold"),
])
def test_evaluate_rejects_nonsense_numbers_before_any_work(tmp_path, args, option):
    done = _evaluate("--data", str(tmp_path), *args, "-o", str(tmp_path / "r"))
    assert done.exit_code == 2 and f"Invalid value for '{option}'" in done.stderr
    assert not (tmp_path / "r").exists()


def test_evaluate_loads_a_named_model_before_any_work(tmp_path, caplog):
    # a --model without its .json was left out with a warning after all the work, and
    # the run exited 0 with a report that did not mention it (audit of 2026-12-07)
    bad = tmp_path / "mine.onnx"
    bad.write_text("not a model")
    done = _evaluate("--data", str(tmp_path), "--model", str(bad), "-o", str(tmp_path / "r"))
    assert done.exit_code == 2 and "mine.json is missing" in done.stderr
    assert not (tmp_path / "r").exists()
    # named but not compared: said, not silently ignored
    with caplog.at_level("WARNING"):
        done = _evaluate("--data", str(tmp_path), "--model", str(bad), "--scorer",
                         "sharpness", "-o", str(tmp_path / "r"))
    assert f"--model {bad} is not used: add --scorer student" in caplog.text


def test_bench_rejects_fewer_than_one_repeat():
    from click.testing import CliRunner

    from fiqa_gate.evaluation.cli import bench

    done = CliRunner().invoke(bench, ["--repeats", "0"])
    assert done.exit_code == 2 and "Invalid value for '--repeats'" in done.stderr


def test_evaluate_help_says_what_the_identity_folder_reader_accepts():
    text = " ".join(_evaluate("--help").output.split())
    assert "root/<identity>/images" not in text
    assert "one sub-folder per identity" in text and "at any depth" in text
    assert "files directly in ROOT are ignored" in text


def test_identity_folder_reads_every_file_at_any_depth_and_not_in_root(tmp_path):
    # every file, as enroll reads them: a JPEG without a suffix is a face, and a note is
    # an unreadable image that evaluate reports, not one it silently leaves out
    from fiqa_gate.datasets import identity_folder

    (tmp_path / "ann" / "2020" / "trip").mkdir(parents=True)
    for p in ("ann/a.jpg", "ann/2020/trip/b.PNG", "loose.jpg", "ann/notes.txt"):
        (tmp_path / p).write_bytes(b"")
    assert [(i, p.relative_to(tmp_path).as_posix()) for i, p in identity_folder(tmp_path)] \
        == [("ann", "ann/2020/trip/b.PNG"), ("ann", "ann/a.jpg"), ("ann", "ann/notes.txt")]


def test_identity_folders_count_each_picture_once_under_one_identity(tmp_path, caplog):
    # A link must not count one person again under a second name (bob -> ann), nor
    # everyone under one (0all -> ., ann/up -> ../..); enroll, evaluate and training
    # all read identities through this one function.
    from fiqa_gate.images import identity_folders

    root = tmp_path / "root"
    (root / "ann" / "sub").mkdir(parents=True)
    for f in ("ann/a.jpg", "ann/sub/b.jpg", "loose.jpg"):
        (root / f).write_bytes(b"")
    (root / "dee").mkdir()
    (root / "dee" / "d.jpg").write_bytes(b"")
    (tmp_path / "out" / "E").mkdir(parents=True)  # a folder outside ROOT, linked twice
    (tmp_path / "out" / "E" / "e.jpg").write_bytes(b"")
    (tmp_path / "beside").mkdir()  # next to ROOT: reachable only by climbing above it
    (tmp_path / "beside" / "x.jpg").write_bytes(b"")
    links = {"bob": "ann", "ann2": "ann/sub", "0all": ".", "0dee": str(root / "dee"),
             "loop": "loop", "gone": "nowhere", "ann/up": "../..", "ann/ext": "../../out/E",
             "dee/ext": str(tmp_path / "out" / "E"), "dee/a.jpg": "../ann/a.jpg",
             "dee/stray.jpg": "../loose.jpg", "dee/lost.jpg": "../ann/lost.jpg"}
    for link, target in links.items():
        (root / link).symlink_to(target)
    os.link(root / "dee" / "d.jpg", root / "dee" / "hard.jpg")
    (root / "eve").mkdir()  # only a hard link of another's picture: named, since it empties
    os.link(root / "dee" / "d.jpg", root / "eve" / "g.jpg")
    with caplog.at_level("WARNING"):
        found = {who: sorted(os.path.relpath(f, root) for f in files)
                 for who, files in identity_folders(root)}
    # d.jpg is under dee and (hard-linked) under eve, e.jpg under ann and dee (a folder
    # outside ROOT linked twice): whose each is is unknown, so neither counts anywhere
    assert found == {"ann": ["ann/a.jpg", "ann/sub/b.jpg"],
                     "dee": ["dee/lost.jpg"],  # it fails when read
                     "eve": []}
    log = caplog.text.replace(f"{root}/", "")
    assert "1 files directly in the folder skipped; an identity's images go in " \
        "ROOT/<identity>/: loose.jpg" in log
    assert "2 links that lead to no file or folder skipped: gone, loop" in log
    assert "4 identity folders skipped: links into another identity's folder, into ROOT " \
        "or above it: 0all (ROOT or above it), 0dee (in 'dee'), ann2 (in 'ann'), ..." in log
    assert "3 files and folders skipped: reached through a link into another identity's " \
        "folder, into ROOT or above it: ann/up (ROOT or above it), dee/a.jpg (in 'ann'), " \
        "dee/stray.jpg (in ROOT)" in log
    assert "2 pictures skipped, each found under two or more identities (a hard link or " \
        "a byte-for-byte copy), so whose it is is unknown: ann/ext/e.jpg = dee/ext/e.jpg, " \
        "dee/d.jpg = dee/hard.jpg = eve/g.jpg" in log
    assert "1 identities left with no file of their own: eve" in log
    # evaluate and training compare faces: one picture under two names is one face
    from fiqa_gate.datasets import identity_folder

    os.unlink(root / "eve" / "g.jpg")
    caplog.clear()
    with caplog.at_level("WARNING"):
        listed = [os.path.relpath(p, root) for _, p in identity_folder(root)]
    assert "dee/hard.jpg" not in listed and "dee/d.jpg" in listed
    assert "1 images skipped, each the same picture as one listed before (a second name " \
        "or a byte-for-byte copy): dee/hard.jpg (= dee/d.jpg)" in caplog.text.replace(
            f"{root}/", "")
    # a folder outside ROOT linked at the top under two names is no one's, as a picture
    # under two identities is (the first name had kept it); a real folder in ROOT keeps
    # its name over a link to it (bob -> ann above)
    (tmp_path / "out" / "F").mkdir()
    (tmp_path / "out" / "F" / "f.jpg").write_bytes(b"")
    for name in ("fay", "fred"):
        (root / name).symlink_to(tmp_path / "out" / "F")
    caplog.clear()
    with caplog.at_level("WARNING"):
        names = [who for who, _ in identity_folders(root)]
    assert "fay" not in names and "fred" not in names and "ann" in names
    assert "1 identity folders skipped: links of two or more names to one folder, so " \
        "whose it is is unknown: fay = fred" in caplog.text.replace(f"{root}/", "")


def test_one_name_in_two_unicode_forms_is_one_identity(tmp_path, orl_root, caplog):
    # Zoë composed on one machine and decomposed on a Mac were two identities: her own
    # pictures became impostor pairs and set the threshold (audit of 2026-12-08)
    from fiqa_gate.images import identity_folders

    root = tmp_path / "root"
    for name, s, i in (("Zo\u00eb", "s31", 1), ("Zoe\u0308", "s31", 2), ("ann", "s32", 1),
                       ("Zoe\u0308", "s31", 3)):
        (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(orl_root / s / f"{i}.pgm", root / name / f"{i}.pgm")
    (root / "Ren\u00e9e").mkdir()  # one spelling only: kept as it is
    shutil.copy(orl_root / "s33" / "1.pgm", root / "Ren\u00e9e" / "1.pgm")
    with caplog.at_level("WARNING"):
        found = {who: sorted(Path(f).name for f in files)
                 for who, files in identity_folders(root, once=True)}
    assert found == {"Zo\u00eb": ["1.pgm", "2.pgm", "3.pgm"], "ann": ["1.pgm"],
                     "Ren\u00e9e": ["1.pgm"]}
    assert "1 identity folders spelt alike in two Unicode forms, each taken as one person: " \
        "Zo\u00eb (2 folders)" in caplog.text
    # enroll keeps each folder's spelling, which a gallery's reruns and --prune follow
    # (merged, a gallery holding the decomposed one had the person twice: audit of the
    # change, 2026-12-08), and says how to make them one
    caplog.clear()
    with caplog.at_level("WARNING"):
        found = {who: sorted(Path(f).name for f in files)
                 for who, files in identity_folders(root)}
    assert found == {"Zo\u00eb": ["1.pgm"], "Zoe\u0308": ["2.pgm", "3.pgm"], "ann": ["1.pgm"],
                     "Ren\u00e9e": ["1.pgm"]}
    assert "enrolled apart, as the folders are; rename one to the other's spelling" in \
        caplog.text


def test_a_mac_zips_resource_folder_is_no_one_and_an_empty_folder_is_named(tmp_path, orl_root,
                                                                          caplog):
    # a folder unzipped from a Mac holds __MACOSX/<identity>/._*: it was enrolled as a
    # fourth identity with no faces ("30 faces of 4 identities"), and an empty identity
    # folder went unsaid (audit of 2026-12-08)
    from fiqa_gate.images import identity_folders, iter_files

    root = tmp_path / "root"
    for s in ("s31", "s32"):
        (root / s).mkdir(parents=True)
        shutil.copy(orl_root / s / "1.pgm", root / s / "1.pgm")
        (root / "__MACOSX" / s).mkdir(parents=True)
        (root / "__MACOSX" / s / "._1.pgm").write_bytes(b"\0\5\26\7" + bytes(80))
    (root / "__MACOSX" / "s31" / "stray.jpg").write_bytes(b"x")  # not a picture of s31
    (root / "s33").mkdir()
    with caplog.at_level("WARNING"):
        found = [who for who, _ in identity_folders(root)]
    assert found == ["s31", "s32", "s33"]
    assert "__MACOSX" not in caplog.text
    assert "1 identity folders with no files (nothing to read in them): s33" in caplog.text
    assert [Path(f).name for f in iter_files([root])] == ["1.pgm", "1.pgm"]


def test_a_copied_picture_counts_once_and_a_hidden_folder_is_no_one(tmp_path, orl_root, caplog):
    # A byte-for-byte copy of one person's picture in another's folder made a pair of
    # "two people" at similarity 1, which moved the FMR threshold from 0.27 to 0.83 and
    # made every scorer look like random (audit of 2026-12-07). It is the same picture as
    # a hard link is; inside one identity it would match itself.
    from fiqa_gate.evaluation.cli import _one_name_per_file
    from fiqa_gate.images import identity_folders

    root = tmp_path / "root"
    for s in ("s31", "s32"):
        (root / s).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(orl_root / s / f"{i}.pgm", root / s / f"{i}.pgm")
    shutil.copy(orl_root / "s31" / "1.pgm", root / "s32" / "copy.pgm")
    shutil.copy(orl_root / "s32" / "2.pgm", root / "s32" / "again.pgm")
    (root / "s32" / "empty.pgm").write_bytes(b"")  # fails as empty, not as a copy
    (root / "s31" / "empty.pgm").write_bytes(b"")
    (root / ".Trash-1000" / "files").mkdir(parents=True)  # no one's: skipped, not a person
    shutil.copy(orl_root / "s33" / "1.pgm", root / ".Trash-1000" / "files" / "1.pgm")
    with caplog.at_level("WARNING"):
        found = {who: sorted(Path(f).name for f in files)
                 for who, files in identity_folders(root, once=True)}
    # s31/1.pgm is also in s32's folder: which is right is unknown, so neither counts
    # (keeping the first had kept the misfiled copy whenever its folder sorted first)
    assert found == {"s31": ["2.pgm", "empty.pgm"],
                     "s32": ["1.pgm", "2.pgm", "empty.pgm"]}
    log = caplog.text.replace(f"{root}/", "")
    assert "1 hidden folders skipped (a .Trash or .git is no person): .Trash-1000" in log
    assert "1 pictures skipped, each found under two or more identities" in log
    assert "s31/1.pgm = s32/copy.pgm" in log
    assert "1 images skipped, each the same picture as one listed before (a second name " \
        "or a byte-for-byte copy): s32/again.pgm (= s32/2.pgm)" in log
    # enroll lists a second copy inside one identity (a row of its own), never across
    enroll = dict(identity_folders(root))
    assert sorted(Path(f).name for f in enroll["s32"]) == \
        ["1.pgm", "2.pgm", "again.pgm", "empty.pgm"]
    assert sorted(Path(f).name for f in enroll["s31"]) == ["2.pgm", "empty.pgm"]
    # a pairs list names a copy by its first path, so a pair of copies is an image with
    # itself and a pair through a copy repeats the one through the original
    names = _one_name_per_file({str(root / "s32" / f) for f in ("2.pgm", "again.pgm")}
                               | {str(root / "s31" / "empty.pgm"),
                                  str(root / "s32" / "empty.pgm")})
    assert names[str(root / "s32" / "again.pgm")] == str(root / "s32" / "2.pgm")
    assert names[str(root / "s32" / "empty.pgm")] == str(root / "s32" / "empty.pgm")


def test_evaluate_warns_on_stderr_and_lists_the_files_it_wrote(tmp_path, orl_root):
    # two people, two clean pictures each: few impostor pairs, nothing to discard, one
    # identity enrolled -- each said on stderr, not only in report.md
    folder = tmp_path / "people"
    for s in ("s31", "s32"):
        (folder / s).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(orl_root / s / f"{i}.pgm", folder / s / f"{i}.pgm")
    out = tmp_path / "r"
    done = _evaluate("--data", str(folder), "--variants", "0", "--bootstrap", "0",
                     "--scorer", "sharpness", "-o", str(out))
    assert done.exit_code == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["e0"] == 0 and report["verification"]["warning"]
    err = done.stderr
    assert "warning: only 4 non-mated comparisons" in err and "relaxed from 0.001" in err
    assert "warning: every pAUC is n/a: FNMR is 0 with nothing discarded" in err
    assert "--variants 0 adds no degraded faces" in err
    assert report["identification"]["identities_enrolled"] == 1
    assert report["identities"] == 2 and "4 faces of 2 identities; embedding" in err
    assert "warning: identification: 1 identity enrolled" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"report: {out / 'report.md'} (+ ")
    listed = last.split("(+ ")[1].rstrip(")").split(", ")
    assert sorted(listed) == ["edc.png", "report.json", "scores.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*listed, "report.md"])


def test_report_warnings_explain_only_what_went_wrong():
    from fiqa_gate.evaluation.cli import _report_warnings

    fine = {"verification": {"warning": None, "e0": 0.12, "tau": 0.3},
            "degradation": {"variants_per_image": 3},
            "identification": {"identities_enrolled": 7, "mated_probes": 40,
                               "nonmated_probes": 120, "fpir": 0.05, "most_candidates": 6}}
    assert _report_warnings(fine) == []
    pairs = {"verification": {"warning": None, "e0": 0.0, "tau": 0.3}}  # --pairs: no variants
    (note,) = _report_warnings(pairs)
    assert "every pAUC is n/a" in note and "tau 0.300" in note and "--variants" not in note
    harder = {**fine, "verification": {"warning": None, "e0": 0.0, "tau": 0.3}}
    assert "more --variants" in _report_warnings(harder)[0]
    no_probes = {**fine, "identification": {**fine["identification"], "mated_probes": 0}}
    assert _report_warnings(no_probes) == [
        "identification: no mated probes (an enrolled identity needs 2 or more pictures: "
        "the first half enroll, the rest probe), so rank-1 is n/a"]
    few = {**fine, "identification": {**fine["identification"], "nonmated_probes": 4}}
    assert _report_warnings(few) == [
        "identification: only 4 non-mated searches (probes of the 30 % of identities not "
        "enrolled): FNIR at FPIR 0.05 rests on 0 of them passing; 100 or more give it "
        "meaning"]


def test_a_report_names_the_model_file_it_measured(tmp_path, orl_root):
    from fiqa_gate.assets import sha256_file
    from fiqa_gate.student import SHIPPED_STUDENT

    model = tmp_path / "mine.onnx"
    shutil.copy(SHIPPED_STUDENT, model)
    shutil.copy(SHIPPED_STUDENT.with_suffix(".json"), model.with_suffix(".json"))
    folder = tmp_path / "people"
    for s in ("s31", "s32", "s33"):
        (folder / s).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(orl_root / s / f"{i}.pgm", folder / s / f"{i}.pgm")
    done = _evaluate("--data", str(folder), "--variants", "0", "--bootstrap", "0",
                     "--scorer", "student", "--model", str(model), "-o", str(tmp_path / "r"))
    assert done.exit_code == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["models"] == {"student": {"path": str(model.resolve()),
                                            "sha256": sha256_file(model)}}
    done = _evaluate("--data", str(folder), "--variants", "0", "--bootstrap", "0",
                     "--scorer", "student", "-o", str(tmp_path / "r2"))
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert report["models"]["student"]["sha256"] == sha256_file(SHIPPED_STUDENT)


def test_the_score_plot_of_the_random_scorer_alone_is_drawn(tmp_path):
    from fiqa_gate.evaluation.report import plot_scores

    rng = np.random.default_rng(0)
    path = plot_scores({"random": rng.random(50)}, rng.random(50) > 0.5, tmp_path / "s.png",
                       "random only")
    assert path.stat().st_size > 0


def test_pairs_lists_are_read_as_csv_and_lfw_readers_read_them(tmp_path, caplog):
    # names a CSV writer quotes (a line break), spaces a name really has, a leading '#',
    # numbers as LFW identity names (CASIA-WebFace) and glob characters in them
    import csv as csv_module

    from fiqa_gate.datasets import read_pairs, sample_seed
    from fiqa_gate.errors import FiqaGateError

    names = ["new\nline.jpg", "trail.jpg ", "#s1/a.jpg", "plain.jpg"]
    for n in names:
        (tmp_path / n).parent.mkdir(exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as fh:
        fh.write("# made by hand, for a test\n")  # a comment: no file has that name
        writer = csv_module.writer(fh)
        writer.writerow(["path_a", "path_b", "mated"])
        writer.writerows([[names[0], names[1], 1], [names[2], names[3], 0]])
        fh.write("plain.jpg , #s1/a.jpg, 1\r\n")  # hand-written: spaces around cells
        fh.write("plain.jpg,trail.jpg ,FALSE\r\n")  # as a spreadsheet writes it
        fh.write("plain.jpg,trail.jpg ,1.0\r\n")  # as pandas writes a float column
    assert read_pairs(tmp_path / "pairs.csv", tmp_path) == [
        (str(tmp_path / names[0]), str(tmp_path / names[1]), True),
        (str(tmp_path / names[2]), str(tmp_path / names[3]), False),
        (str(tmp_path / "plain.jpg"), str(tmp_path / "#s1/a.jpg"), True),
        (str(tmp_path / "plain.jpg"), str(tmp_path / names[1]), False),
        (str(tmp_path / "plain.jpg"), str(tmp_path / names[1]), True)]
    (tmp_path / "Mated.csv").write_text("A,B,Mated\nplain.jpg,trail.jpg ,0\n")
    assert read_pairs(tmp_path / "Mated.csv", tmp_path) == [
        (str(tmp_path / "plain.jpg"), str(tmp_path / names[1]), False)]
    (tmp_path / "odd.csv").write_text("plain.jpg,trail.jpg ,yes\n")
    with pytest.raises(FiqaGateError, match=r"odd\.csv:1: expected path_a,path_b,mated "
                       r"with mated 1/0 or true/false; found mated 'yes'"):
        read_pairs(tmp_path / "odd.csv", tmp_path)

    lfw = tmp_path / "lfw"
    for name in ("0000045", "0000099", "Jo[s]e"):
        (lfw / name).mkdir(parents=True)
        for i in (1, 2):
            (lfw / name / f"{name}_000{i}.png").write_bytes(b"")
    (tmp_path / "pairs.txt").write_text("\ufeff1\t3\n# then, the pairs\n0000045\t1\t2\nJo[s]e 1 2\n"
                                        "0000045 1 0000099 2\n", encoding="utf-8")
    assert [tuple(os.path.relpath(p, lfw) if isinstance(p, str) else p for p in row)
            for row in read_pairs(tmp_path / "pairs.txt", lfw)] == [
        ("0000045/0000045_0001.png", "0000045/0000045_0002.png", True),
        ("Jo[s]e/Jo[s]e_0001.png", "Jo[s]e/Jo[s]e_0002.png", True),
        ("0000045/0000045_0001.png", "0000099/0000099_0002.png", False)]
    # one fold of 3 mated and 3 non-mated pairs promised, 3 listed: a cut copy, said so
    assert "its first line promises 6 pairs; it lists 3" in caplog.text
    # an undecodable file name (POSIX bytes) draws its degradations like any other
    assert sample_seed(7, "s1/\udcff1.png", 0) != sample_seed(7, "s1/\udcfe1.png", 0)


FLAKY_PLUGIN = '''
import numpy as np
from fiqa_gate.components import Scorer
from fiqa_gate.hookspecs import hookimpl


class NoScoreForSome(Scorer):
    name = "no-score-for-some"

    def raw_scores(self, faces):
        out = np.arange(len(faces), dtype=float)
        out[::3] = np.nan  # a model that cannot rate every face
        return out


class Broken(Scorer):
    name = "broken"

    def raw_scores(self, faces):
        raise RuntimeError("model server timed out")


class OneShort(Scorer):
    name = "one-short"

    def raw_scores(self, faces):
        return np.ones(len(faces) - 1)


def no_model(ctx):
    raise FileNotFoundError("model.onnx")


@hookimpl
def register_scorers(register):
    register("no-score-for-some", lambda ctx: NoScoreForSome(), "NaN for every third face")
    register("broken", lambda ctx: Broken(), "always fails")
    register("one-short", lambda ctx: OneShort(), "a score too few")
    register("no-model", no_model, "cannot load")
'''


def test_evaluate_survives_a_scorer_plugin_that_fails(tmp_path, orl_root):
    # A user's scorer plugin that raises is left out, and one that cannot rate some faces
    # has them counted as its lowest quality: neither takes the run down.
    site = tmp_path / "site"
    (site / "flaky-0.1.dist-info").mkdir(parents=True)
    (site / "flaky_scorers.py").write_text(FLAKY_PLUGIN)
    (site / "flaky-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: flaky\nVersion: 0.1\n")
    (site / "flaky-0.1.dist-info" / "entry_points.txt").write_text(
        "[fiqa_gate]\nflaky = flaky_scorers\n")
    folder = tmp_path / "people"
    for s in ("s31", "s32", "s33"):
        (folder / s).mkdir(parents=True)
        for i in (1, 2, 3):
            shutil.copy(orl_root / s / f"{i}.pgm", folder / s / f"{i}.pgm")
    done = subprocess.run(
        [sys.executable, "-m", "fiqa_gate", "evaluate", "--data", str(folder), "--variants",
         "1", "--bootstrap", "0", "--scorer", "sharpness", "--scorer", "broken", "--scorer",
         "no-score-for-some", "--scorer", "one-short", "--scorer", "no-model", "-o",
         str(tmp_path / "r")], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(site)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scorer broken failed (RuntimeError: model server timed out); left out" \
        in done.stderr
    assert "scorer no-score-for-some gave 6 of 18 faces no finite score; each counts as its " \
        "lowest quality" in done.stderr
    assert "scorer one-short failed (ValueError: 17 scores for 18 faces)" in done.stderr
    assert "scorer no-model failed (PluginError: scorer 'no-model' of plugin flaky could not " \
        "be made: FileNotFoundError: model.onnx)" in done.stderr
    rep = _strict_json(tmp_path / "r" / "report.json")
    assert set(rep["erc"]) == {"sharpness", "no-score-for-some"}


def test_evaluate_and_bench_refuse_an_unwritable_output_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    done = _cli("evaluate", "-o", str(tmp_path / "a-file" / "report"))
    assert done.returncode == 2 and "cannot write to" in done.stderr
    assert "embedding" not in done.stderr and "Traceback" not in done.stderr
    done = _cli("bench", "--repeats", "1", "-o", str(tmp_path / "a-file" / "bench.json"))
    assert done.returncode == 2 and "cannot write to" in done.stderr and not done.stdout


def test_a_scorer_calibrated_for_another_recognizer_is_said_in_evaluate(caplog,
                                                                       twin_recognizer):
    # gated enrollment with dlib used the student's SFace calibration without a word,
    # where `filter` warns (audit of 2026-12-07)
    from fiqa_gate.datasets import Samples
    from fiqa_gate.evaluation.protocol import qualities

    crops = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    samples = Samples(crops, ["a", "b"], ["a/1", "b/1"], [[], []], np.ones(2))
    with caplog.at_level("WARNING"):
        _, calibrated = qualities(samples, ["student"], twin_recognizer)
    assert "student" in calibrated
    assert "scorer 'student' is calibrated for sface, not sface-twin" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        qualities(samples, ["student"], "sface")
        qualities(samples, ["student"], "dlib")  # its map ships
    assert "calibrated for" not in caplog.text
    # a map fitted for dlib (`evaluate --calibration`) is used over the shipped one
    from fiqa_gate.calibration import Calibration

    for_dlib = Calibration([-10.0, 10.0], [0.25, 0.75], "dlib")
    caplog.clear()
    with caplog.at_level("WARNING"):
        raw, calibrated = qualities(samples, ["student"], "dlib",
                                    calibrations={"student": for_dlib})
    assert "calibrated for" not in caplog.text
    np.testing.assert_allclose(calibrated["student"], for_dlib(raw["student"]))
    assert qualities(samples, ["student"], "dlib", raw_only=True)[1] == {}


def test_best_of_n_with_one_candidate_each_says_it_cannot_choose(tmp_path, orl_root):
    # two pictures a person and no degraded copies: one candidate each, and the table of
    # +0.0 gains had no word on why (audit of 2026-12-07)
    folder = orl_people(tmp_path / "people", orl_root, ("s31", "s32", "s33", "s34"))
    done = _evaluate("--data", str(folder), "--variants", "0", "--bootstrap", "0",
                     "--scorer", "sharpness", "-o", str(tmp_path / "r"))
    assert done.exit_code == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["identification"]["most_candidates"] == 1
    assert "best-of-N has nothing to choose and equals random" in done.stderr


def test_a_scorer_returning_a_tuple_of_floats_is_read_as_the_gate_reads_it():
    # a tuple of floats per chunk had been joined as a tuple of arrays and failed
    # (audit of 2026-12-07)
    from fiqa_gate.components import Scorer
    from fiqa_gate.datasets import Samples
    from fiqa_gate.evaluation.protocol import qualities
    from fiqa_gate.hookspecs import hookimpl

    class Tupled(Scorer):
        name = "tupled"

        def raw_scores(self, faces):
            return tuple(float(f.crop.mean()) for f in faces)

    class Plugin:
        @hookimpl
        def register_scorers(self, register):
            register("tupled", lambda ctx: Tupled(), "")

    crops = np.random.default_rng(0).integers(0, 255, (300, 112, 112, 3), dtype=np.uint8)
    names = [f"p{i % 3}" for i in range(300)]
    samples = Samples(crops, names, [f"{n}/{i}" for i, n in enumerate(names)],
                      [[] for _ in names], np.ones(300))
    pm = registry.plugin_manager()
    pm.register(Plugin(), name="tupled-plugin")
    try:  # 300 faces: two chunks
        raw, _ = qualities(samples, ["tupled"], "sface")
    finally:
        pm.unregister(name="tupled-plugin")
    assert raw["tupled"].shape == (300,)
    np.testing.assert_allclose(raw["tupled"], crops.reshape(300, -1).mean(axis=1))


def test_a_report_folder_inside_data_is_refused_before_any_work(tmp_path, orl_root):
    # its edc.png and scores.png were read back as one more identity on the next run
    # (audit of 2026-12-07); directly in ROOT a report is no one's and is allowed
    folder = tmp_path / "people"
    for s in ("s31", "s32"):
        shutil.copytree(orl_root / s, folder / s)
    (tmp_path / "link").symlink_to(folder)
    shutil.copytree(orl_root / "s33", tmp_path / "elsewhere" / "s33")  # linked identity
    (folder / "s33").symlink_to(tmp_path / "elsewhere" / "s33")
    for out in (folder / "report", tmp_path / "link" / "s31" / "r", folder / "s33" / "r",
                tmp_path / "elsewhere" / "s33" / "r", tmp_path / "elsewhere" / "s33"):
        done = _evaluate("--data", str(folder), "-o", str(out))
        assert done.exit_code == 2 and "is inside --data" in done.stderr, (out, done.stderr)
        assert not (out / "report.json").exists()
    done = _evaluate("--data", str(folder), "--variants", "0", "--bootstrap", "0",
                     "--scorer", "sharpness", "-o", str(folder))
    assert done.exit_code == 0, done.stderr[-2000:]
    assert (folder / "report.json").is_file()


def test_a_report_folder_keeps_files_fiqa_gate_did_not_write(tmp_path, orl_root):
    # `evaluate -o FOLDER` replaced the user's own report.md without a word, and a folder
    # named report.json failed only after the whole run, its plots already replaced
    # (audit of 2026-12-08)
    people = orl_people(tmp_path / "people", orl_root, ("s31", "s32", "s33"))
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "report.md").write_text("# my own notes\n")
    done = _cli("evaluate", "--data", str(people), "--scorer", "sharpness", "-o", str(mine))
    assert done.returncode != 0 and "report.md exists and is not an earlier `fiqa-gate " \
        "evaluate` report" in done.stderr, done.stderr[-2000:]
    assert (mine / "report.md").read_text() == "# my own notes\n"
    assert sorted(p.name for p in mine.iterdir()) == ["report.md"]
    odd = tmp_path / "odd"
    (odd / "report.json").mkdir(parents=True)
    done = _cli("evaluate", "--data", str(people), "--scorer", "sharpness", "-o", str(odd))
    assert done.returncode != 0 and "report.json is a folder" in done.stderr
    assert "faces of" not in done.stderr  # refused before any work
    # an earlier report of its own is replaced
    ours = tmp_path / "ours"
    args = ("evaluate", "--data", str(people), "--scorer", "sharpness", "--bootstrap", "0",
            "--variants", "1", "-o", str(ours))
    assert _cli(*args).returncode == 0
    md = ours / "report.md"  # saved again by an editor that adds a BOM: still its own
    md.write_bytes(b"\xef\xbb\xbf" + md.read_bytes())
    done = _cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    # how many faces are the user's own pictures (it had said only "12 faces")
    assert "12 faces of 3 identities (6 from the pictures, 6 their seeded degraded copies; " \
        "--variants 0 for the pictures alone)" in done.stderr
