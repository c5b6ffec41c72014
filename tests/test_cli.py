"""The CLI contracts of DESIGN.md, run as a user runs them (a subprocess, real models)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import orl_people
from PIL import Image, ImageFilter

FIQA = [sys.executable, "-m", "fiqa_gate"]


def run(*args: str, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run([*FIQA, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def mixed_dir(tmp_path, orl_root, sample_photo) -> Path:
    """Faces, a group photo, a non-face, and broken files."""
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    shutil.copy(orl_root / "s31" / "1.pgm", d / "face.pgm")
    shutil.copy(orl_root / "s32" / "2.pgm", d / "sub" / "face2.pgm")
    shutil.copy(sample_photo, d / "group.jpg")
    Image.new("RGB", (200, 150), (90, 140, 200)).save(d / "sky.png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("not an image")
    (d / "half.jpg").write_bytes(sample_photo.read_bytes()[:4000])
    return d


def test_score_contract(mixed_dir, tmp_path):
    out = tmp_path / "s.csv"
    res = run("score", str(mixed_dir), "--scorer", "detector-confidence", "--output", str(out))
    assert res.returncode == 1, res.stderr  # some inputs failed
    header = out.read_text().splitlines()[0]
    assert header.startswith("path,score")
    table = rows(out)
    by_path: dict[str, list[dict]] = {}
    for r in table:
        by_path.setdefault(r["path"], []).append(r)
    files = {str(p) for p in mixed_dir.rglob("*") if p.is_file()}
    assert set(by_path) == files  # every file, path = directory joined with relative path
    assert len(by_path[str(mixed_dir / "group.jpg")]) == 6  # one row per face
    for name in ("empty.jpg", "notes.jpg", "half.jpg", "sky.png"):
        (r,) = by_path[str(mixed_dir / name)]
        assert r["score"] == "" and r["error"]
    (face,) = by_path[str(mixed_dir / "face.pgm")]
    assert 0.0 <= float(face["score"]) <= 1.0 and face["error"] == ""


def test_score_aligned_crops(tmp_path, orl_root):
    d = tmp_path / "aligned"
    d.mkdir()
    for i in range(3):
        Image.open(orl_root / "s33" / f"{i + 1}.pgm").resize((112, 112)).save(d / f"{i}.png")
    out = tmp_path / "a.csv"
    res = run("score", str(d), "--aligned", "--scorer", "sharpness", "-o", str(out))
    assert res.returncode == 0, res.stderr
    table = rows(out)
    assert len(table) == 3 and all(r["det_score"] == "" and r["score"] for r in table)
    # an ORL picture (92x112) is not an aligned crop: an error row, not a stretched face
    res = run("score", str(orl_root / "s33" / "1.pgm"), "--aligned", "--scorer", "sharpness")
    assert res.returncode == 1 and "not an aligned face crop: 92x112" in res.stdout
    assert "ValueError" not in res.stdout  # a message written to be read, as it is


def test_filter_never_touches_inputs(mixed_dir, tmp_path):
    before = digests(mixed_dir)
    manifest = tmp_path / "m.csv"
    acc, rej = tmp_path / "acc", tmp_path / "rej"
    res = run("filter", "--threshold", "0.5", str(mixed_dir), "--scorer", "detector-confidence",
              "-o", str(manifest), "--accepted-dir", str(acc), "--rejected-dir", str(rej))
    assert res.returncode == 1, res.stderr
    assert digests(mixed_dir) == before  # byte-identical, nothing removed
    table = rows(manifest)
    assert sorted(r["path"] for r in table) == sorted(before)  # each input exactly once
    decisions = {Path(r["path"]).name: r["decision"] for r in table}
    assert decisions["face.pgm"] == "accept" and decisions["group.jpg"] == "accept"
    assert decisions["empty.jpg"] == decisions["notes.jpg"] == decisions["sky.png"] == "error"
    assert (acc / "face.pgm").read_bytes() == (mixed_dir / "face.pgm").read_bytes()
    assert (acc / "sub" / "face2.pgm").is_file()
    assert (rej / "empty.jpg").is_file()
    # Run again into the same folders: identical copies are recognised, never overwritten.
    res2 = run("filter", str(mixed_dir), "--scorer", "detector-confidence", "-o",
               str(tmp_path / "m2.csv"), "--accepted-dir", str(acc))
    assert "already present" in (tmp_path / "m2.csv").read_text()
    assert res2.returncode == 1


def test_filter_threshold_rejects(tmp_path, orl_root):
    d = tmp_path / "f"
    d.mkdir()
    shutil.copy(orl_root / "s34" / "1.pgm", d / "a.pgm")
    res = run("filter", "--threshold", "0.99", str(d), "--scorer", "detector-confidence")
    assert res.returncode == 0, res.stderr
    (r,) = list(csv.DictReader(res.stdout.splitlines()))
    assert r["decision"] == "reject" and "low quality" in r["reason"]


def test_usage_errors_exit_2(tmp_path):
    assert run("filter", "--threshold", "1.5", str(tmp_path)).returncode == 2
    assert run("search", str(tmp_path), "--index", str(tmp_path / "none")).returncode == 2
    assert run("score", str(tmp_path), "--scorer", "no-such-scorer").returncode == 2
    teacherless = run("evaluate", "--scorer", "teacher", "-o", str(tmp_path / "report"))
    assert teacherless.returncode == 2 and "--teacher" in teacherless.stderr
    assert not (tmp_path / "report").exists()  # refused before any face was detected


def test_enroll_search_orl_rank1(orl_split_dirs, tmp_path):
    enroll_dir, probe_dir = orl_split_dirs
    gallery = tmp_path / "gallery"
    res = run("enroll", str(enroll_dir), "--index", str(gallery), "--no-gate")
    assert res.returncode == 0, res.stderr
    hits = tmp_path / "hits.csv"
    res = run("search", str(probe_dir), "--index", str(gallery), "-k", "1", "-o", str(hits))
    assert res.returncode == 0, res.stderr
    table = rows(hits)
    assert len(table) == 50
    correct = sum(Path(r["path"]).parent.name == r["identity"] for r in table)
    assert correct / 50 >= 0.95
    res = run("search", str(probe_dir / "s31" / "6.pgm"), "--index", str(gallery),
              "--recognizer", "dlib")
    assert res.returncode == 2 and "cannot be searched" in res.stderr


def test_enroll_rerun_adds_only_what_is_missing(orl_split_dirs, tmp_path):
    """An interrupted enrollment (here: half the files were there) resumes by running again;
    a third run adds nothing (real SFace, real gallery)."""
    import shutil

    from fiqa_gate.gallery import Gallery

    enroll_dir, _ = orl_split_dirs
    gallery = tmp_path / "gallery"
    for ident in enroll_dir.iterdir():  # the first run saw images 1-2 of each identity
        for f in ident.glob("*.pgm"):
            if int(f.stem) > 2:
                shutil.move(f, tmp_path / f"held-{ident.name}-{f.name}")
    assert run("enroll", str(enroll_dir), "--index", str(gallery), "--no-gate").returncode == 0
    for f in tmp_path.glob("held-*"):
        ident, name = f.name.split("-")[1:]
        shutil.move(f, enroll_dir / ident / name)
    manifest = tmp_path / "second.csv"
    res = run("enroll", str(enroll_dir), "--index", str(gallery), "--no-gate", "-o", str(manifest))
    assert res.returncode == 0, res.stderr
    decisions = {(r["identity"], Path(r["path"]).name): r["decision"] for r in rows(manifest)}
    assert sum(d == "skip" for d in decisions.values()) == 20
    assert sum(d == "enroll" for d in decisions.values()) == 30
    assert decisions[("s31", "1.pgm")] == "skip" and decisions[("s31", "3.pgm")] == "enroll"
    link = tmp_path / "people-link"  # the same folder spelled through a link: same faces
    link.symlink_to(enroll_dir)
    res = run("enroll", str(link), "--index", str(gallery), "--no-gate")
    assert res.returncode == 0 and "enrolled 0 faces" in res.stderr and "50 already" in res.stderr
    g = Gallery.open(gallery)
    assert len(g) == 50 and set(g.identities().values()) == {5}
    # each write rewrites the whole index, so the ten identities of a run are committed
    # together, not one by one (a run of seconds; a commit at least every 5 s)
    assert g.generation() <= 4
    g.close()
    # a picture enrolled before and now also under another identity is skipped under both
    # (whose it is is unknown), and the gallery still holds it: said, not silent
    shutil.copy(enroll_dir / "s31" / "1.pgm", enroll_dir / "s32" / "misfiled.pgm")
    res = run("enroll", str(enroll_dir), "--index", str(gallery), "--no-gate", "-o",
              str(tmp_path / "third.csv"))
    assert res.returncode == 0 and "enrolled 0 faces" in res.stderr
    assert "1 faces the gallery holds are not among their identity folder's pictures" \
        in res.stderr and "the gallery keeps them" in res.stderr
    assert "s31: " in res.stderr and "s31/1.pgm" in res.stderr
    stale = [r for r in rows(tmp_path / "third.csv") if r["decision"] == "stale"]
    assert [(r["identity"], Path(r["path"]).name) for r in stale] == [("s31", "1.pgm")]
    assert len(Gallery.open(gallery)) == 50  # kept until asked
    # --prune removes it (only it), and a rerun then has nothing stale to say
    res = run("enroll", str(enroll_dir), "--index", str(gallery), "--no-gate", "--prune",
              "-o", str(tmp_path / "fourth.csv"))
    assert res.returncode == 0 and "1 removed" in res.stderr, res.stderr
    assert "removed (--prune): s31: " in res.stderr  # named on screen, not only with -o
    assert [(r["identity"], Path(r["path"]).name) for r in rows(tmp_path / "fourth.csv")
            if r["decision"] == "removed"] == [("s31", "1.pgm")]
    g = Gallery.open(gallery)
    assert len(g) == 49 and g.identities()["s31"] == 4 and g.identities()["s32"] == 5
    assert not any(s.endswith("s31/1.pgm") for s in g.sources("s31"))
    g.close()
    res = run("enroll", str(enroll_dir), "--index", str(gallery), "--no-gate", "--prune")
    assert res.returncode == 0 and "not among" not in res.stderr
    assert "removed" not in res.stderr


def test_enroll_prune_removes_only_faces_whose_picture_is_surely_gone(orl_root, tmp_path):
    """--prune removes a deleted picture's face, but not the faces below a folder that
    cannot be listed, nor those of an identity folder that lists nothing now (a drive not
    mounted), nor one another run enrolled after this run listed ROOT (audit of
    2026-12-07: each of these had been removed)."""
    from fiqa_gate.gallery import Gallery

    people, outside = tmp_path / "people", tmp_path / "outside"
    for s, folder in (("s31", people / "s31"), ("s32", people / "s32"), ("s33", outside),
                      ("s34", people / "s34"), ("s37", people / "s37")):
        (folder / "sub").mkdir(parents=True)
        for i in (1, 2, 3):
            shutil.copy(orl_root / s / f"{i}.pgm", folder / ("sub" if i == 3 else ".") /
                        f"{i}.pgm")
    (people / "s33").symlink_to(outside)
    (people / "s35").mkdir()
    shutil.copy(orl_root / "s35" / "1.pgm", people / "s35" / "1.pgm")
    gallery = tmp_path / "g"
    assert run("enroll", str(people), "--index", str(gallery), "--no-gate").returncode == 0
    (people / "s32" / "1.pgm").unlink()  # surely gone
    for f in outside.rglob("*.pgm"):  # s33's folder is empty now
        f.unlink()
    # s35's only picture is now also under s36: whose it is is unknown, so it is stale
    (people / "s36").mkdir()
    shutil.copy(people / "s35" / "1.pgm", people / "s36" / "copy.pgm")
    locked = people / "s31" / "sub"
    locked.chmod(0)
    (people / "s34").chmod(0o644)  # listed, but what is below it cannot be looked at
    (people / "s37" / "sub").chmod(0o111)  # entered but not listed: its picture is there
    cmd = [*FIQA, "enroll", str(people), "--index", str(gallery), "--no-gate", "--prune",
           "-o", str(tmp_path / "m.csv")]
    if os.geteuid() == 0:  # as root the mode bits do not apply: drop those capabilities
        if not shutil.which("setpriv"):
            locked.chmod(0o755)
            pytest.skip("needs setpriv to drop root's file capabilities")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        locked.chmod(0o755)
        (people / "s34").chmod(0o755)
        (people / "s37" / "sub").chmod(0o755)
    assert done.returncode == 1, done.stderr  # the folders that cannot be listed
    assert "s33: the identity folder holds no file now" in done.stderr
    removed = [(r["identity"], Path(r["path"]).name) for r in rows(tmp_path / "m.csv")
               if r["decision"] in ("removed", "stale")]
    assert removed == [("s32", "1.pgm"), ("s35", "1.pgm")]
    g = Gallery.open(gallery)
    assert g.identities() == {"s31": 3, "s32": 2, "s33": 3, "s34": 3, "s37": 3}
    # a face enrolled after a run listed ROOT is not that run's to remove
    listed_at = time.time()
    (people / "s32" / "4.pgm").write_bytes((orl_root / "s32" / "4.pgm").read_bytes())
    g.close()
    assert run("enroll", str(people), "--index", str(gallery), "--no-gate").returncode == 0
    g = Gallery.open(gallery)
    new = [s for s in g.sources("s32") if s.endswith("4.pgm")]
    assert g.sources("s32", before=listed_at) == g.sources("s32") - set(new)
    assert g.remove_sources([("s32", new[0])], before=listed_at) == 0
    assert g.remove_sources([("s32", new[0])]) == 1
    g.close()


def test_plugins_lists_first_party():
    res = run("plugins", "--json")
    assert res.returncode == 0
    import json

    data = json.loads(res.stdout)
    names = {p["name"]: p for p in data["plugins"]}
    assert names["sface"]["recognizers"] == ["sface"]
    assert set(names["baselines"]["scorers"]) == {"sharpness", "detector-confidence",
                                                  "embedding-norm"}


def test_import_is_torch_free():
    code = "import fiqa_gate, fiqa_gate.cli, fiqa_gate.gate, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_threshold_needs_a_score_calibrated_for_the_recognizer(tmp_path, orl_root,
                                                                  twin_site):
    d = tmp_path / "f"
    d.mkdir()
    shutil.copy(orl_root / "s34" / "1.pgm", d / "a.pgm")
    twin = {"PYTHONPATH": str(twin_site)}  # a recognizer no map ships for
    # sharpness is calibrated for SFace and dlib only: with another recognizer its raw
    # value (thousands) would have passed any threshold
    res = run("filter", str(d), "--scorer", "sharpness", "--recognizer", "sface-twin",
              env=twin)
    assert res.returncode == 2 and "no calibration for recognizer 'sface-twin'" in res.stderr
    assert res.stdout == ""
    # scoring alone works, and says what the score column then is
    res = run("score", str(d), "--scorer", "sharpness", "--recognizer", "sface-twin", env=twin)
    assert res.returncode == 0 and "raw output clipped" in res.stderr
    # the student is calibrated for SFace: with another recognizer it works, with a warning
    res = run("filter", str(d), "--recognizer", "sface-twin", env=twin)
    assert res.returncode == 0 and "calibrated for sface, not sface-twin" in res.stderr
    assert "calibrated for" not in run("filter", str(d)).stderr
    # dlib's maps ship: each scorer gates on its own, without a warning
    for scorer in ("student", "sharpness"):
        res = run("filter", str(d), "--scorer", scorer, "--recognizer", "dlib")
        assert res.returncode == 0 and "calibrat" not in res.stderr, res.stderr


def test_search_needs_at_least_one_hit(tmp_path):
    res = run("search", str(tmp_path), "--index", str(tmp_path / "g"), "-k", "0")
    assert res.returncode == 2 and "--top-k" in res.stderr


def test_unwritable_outputs_are_usage_errors_and_dev_null_is_fine(tmp_path, orl_root):
    d = tmp_path / "f"
    d.mkdir()
    shutil.copy(orl_root / "s34" / "1.pgm", d / "a.pgm")
    for target in (tmp_path, tmp_path / "missing" / "m.csv"):  # a folder, a missing parent
        res = run("score", str(d), "-o", str(target))
        assert res.returncode == 2 and "cannot write the manifest" in res.stderr
        assert "Traceback" not in res.stderr
    assert run("filter", str(d), "-o", os.devnull).returncode == 0
    (tmp_path / "g").write_text("not a gallery")
    res = run("enroll", str(tmp_path / "people"), "--index", str(tmp_path / "g"))
    assert res.returncode == 2
    (tmp_path / "people" / "ann").mkdir(parents=True)
    shutil.copy(orl_root / "s34" / "1.pgm", tmp_path / "people" / "ann" / "1.pgm")
    res = run("enroll", str(tmp_path / "people"), "--index", str(tmp_path / "g"))
    assert res.returncode == 2 and "is a file, not a gallery folder" in res.stderr
    assert (tmp_path / "g").read_text() == "not a gallery"


def test_enroll_says_which_files_belong_to_no_identity(tmp_path, orl_root):
    people = tmp_path / "people"
    (people / "ann").mkdir(parents=True)
    shutil.copy(orl_root / "s35" / "1.pgm", people / "ann" / "1.pgm")
    shutil.copy(orl_root / "s35" / "2.pgm", people / "loose.pgm")
    res = run("enroll", str(people), "--index", str(tmp_path / "g"))
    assert res.returncode == 0, res.stderr
    assert "1 files directly in the folder skipped; an identity's images go in " \
        "ROOT/<identity>/: loose.pgm" in res.stderr
    assert "enrolled 1 faces of 1 identities" in res.stderr


def test_empty_input_warns_and_a_gated_probe_says_why(tmp_path, orl_root):
    (tmp_path / "empty").mkdir()
    res = run("score", str(tmp_path / "empty"))
    assert res.returncode == 0 and "no files under" in res.stderr
    people = tmp_path / "people" / "ann"
    people.mkdir(parents=True)
    shutil.copy(orl_root / "s36" / "1.pgm", people / "1.pgm")
    assert run("enroll", str(tmp_path / "people"), "--index", str(tmp_path / "g")).returncode == 0
    probe = tmp_path / "probe.png"
    Image.open(orl_root / "s36" / "2.pgm").filter(ImageFilter.GaussianBlur(6)).save(probe)
    res = run("search", str(probe), "--index", str(tmp_path / "g"), "--gate",
              "--threshold", "0.9")
    (row,) = list(csv.DictReader(res.stdout.splitlines()))
    assert row["error"].startswith("probe rejected by the gate: low quality: score 0.")
    assert res.returncode == 1  # a row with an error: the probe was not searched
    res = run("search", str(orl_root / "s36" / "3.pgm"), "--index", str(tmp_path / "g"),
              "--gate", "--threshold", "0.5")
    (row,) = list(csv.DictReader(res.stdout.splitlines()))
    assert res.returncode == 0 and row["identity"] == "ann" and not row["error"]


def test_a_resumed_filter_keeps_its_threshold_and_counts_what_was_done(tmp_path, orl_root):
    d = tmp_path / "f"
    d.mkdir()
    for i in (1, 2):
        shutil.copy(orl_root / "s37" / f"{i}.pgm", d / f"{i}.pgm")
    manifest = tmp_path / "m.csv"
    assert run("filter", str(d / "1.pgm"), "-o", str(manifest)).returncode == 0
    before = manifest.read_bytes()
    res = run("filter", str(d), "-o", str(manifest), "--resume", "--threshold", "0.9")
    assert res.returncode == 2 and "written with --threshold 0.5" in res.stderr
    assert manifest.read_bytes() == before
    res = run("filter", str(d), "-o", str(manifest), "--resume")
    assert res.returncode == 0 and "1 done before, in the manifest" in res.stderr
    assert len(rows(manifest)) == 2
    res = run("filter", str(d), "--resume")  # nothing to resume into on stdout
    assert res.returncode == 2 and "give it with -o FILE" in res.stderr


def test_an_output_that_is_not_a_manifest_is_never_overwritten(tmp_path, orl_root):
    d = tmp_path / "in"
    d.mkdir()
    for i in (1, 2):
        shutil.copy(orl_root / "s34" / f"{i}.pgm", d / f"{i}.pgm")
    before = digests(d)
    notes, labels = tmp_path / "notes.csv", tmp_path / "labels.csv"
    notes.write_text("name,age\nann,3\n")
    labels.write_text("path,label\nimgs/a.jpg,ann\n")  # a user's list, headed like ours
    for command in ("score", "filter"):
        for target in (d / "1.pgm", notes, labels):  # one of the inputs; a user's CSVs
            res = run(command, str(d), "-o", str(target))
            assert res.returncode == 2 and "is not a fiqa-gate manifest" in res.stderr
    assert digests(d) == before and notes.read_text() == "name,age\nann,3\n"
    assert labels.read_text() == "path,label\nimgs/a.jpg,ann\n"
    torn = tmp_path / "torn.csv"  # a header a kill cut short is the run's own
    torn.write_text("path,sco")
    assert run("score", str(d), "-o", str(torn)).returncode == 0 and len(rows(torn)) == 2
    # an earlier run's manifest, of another command too, is rewritten as asked
    out = tmp_path / "m.csv"
    assert run("score", str(d), "-o", str(out)).returncode == 0
    assert run("filter", str(d), "-o", str(out)).returncode == 0
    assert [r["decision"] for r in rows(out)] == ["accept", "accept"]


def test_search_keeps_the_gallery_and_its_probes_and_refuses_an_empty_gallery(tmp_path,
                                                                              orl_root):
    from fiqa_gate.gallery import Gallery

    people, probes, g = tmp_path / "people", tmp_path / "probes", tmp_path / "g"
    (people / "ann").mkdir(parents=True)
    probes.mkdir()
    shutil.copy(orl_root / "s34" / "1.pgm", people / "ann" / "1.pgm")
    shutil.copy(orl_root / "s34" / "2.pgm", probes / "2.pgm")
    assert run("enroll", str(people), "--index", str(g), "--no-gate").returncode == 0
    kept = digests(g) | digests(probes)
    for target in (g / "meta.sqlite", probes / "2.pgm"):
        res = run("search", str(probes), "--index", str(g), "-o", str(target))
        assert res.returncode == 2 and "is not a fiqa-gate manifest" in res.stderr
    assert digests(g) | digests(probes) == kept
    # results written into the probe folder are not read back as a probe
    res = run("search", str(probes), "--index", str(g), "-k", "1", "-o", str(probes / "h.csv"))
    assert res.returncode == 0, res.stderr
    assert [(Path(r["path"]).name, r["identity"]) for r in rows(probes / "h.csv")] == [
        ("2.pgm", "ann")]
    Gallery.create(tmp_path / "empty", "sface", 128, 0.34).close()
    res = run("search", str(probes), "--index", str(tmp_path / "empty"))
    assert res.returncode == 2 and "holds no faces" in res.stderr and res.stdout == ""


def test_a_gallery_folder_holding_root_enrolls_root(tmp_path, orl_root):
    # a gallery made beside its people by an earlier version (G/meta.sqlite, G/people/):
    # every identity had been skipped as inside the gallery (audit 2026-12-07)
    from fiqa_gate.gallery import Gallery

    g = tmp_path / "G"
    Gallery.create(g, "sface", 128, 0.34).close()
    (g / "people" / "ann").mkdir(parents=True)
    shutil.copy(orl_root / "s34" / "1.pgm", g / "people" / "ann" / "1.pgm")
    res = run("enroll", str(g / "people"), "--index", str(g), "--no-gate")
    assert res.returncode == 0 and "enrolled 1 faces of 1 identities" in res.stderr


def test_a_gallery_inside_root_is_not_an_identity(tmp_path, orl_root):
    people = tmp_path / "people"
    (people / "ann").mkdir(parents=True)
    shutil.copy(orl_root / "s34" / "1.pgm", people / "ann" / "1.pgm")
    for _ in range(2):  # the second run lists ROOT with the gallery's files in it
        res = run("enroll", str(people), "--index", str(people / "gallery"), "--no-gate",
                  "-o", str(tmp_path / "m.csv"))
        assert res.returncode == 0, res.stderr
        assert [Path(r["path"]).name for r in rows(tmp_path / "m.csv")] == ["1.pgm"]


def test_a_moved_root_or_renamed_identity_keeps_its_faces(tmp_path, orl_root):
    from fiqa_gate.gallery import Gallery

    people, g, m = tmp_path / "people", tmp_path / "g", tmp_path / "m.csv"
    for who, s in (("ann", 34), ("bob", 35)):
        (people / who).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(orl_root / f"s{s}" / f"{i}.pgm", people / who / f"{i}.pgm")
    assert run("enroll", str(people), "--index", str(g), "--no-gate").returncode == 0
    with contextlib.closing(Gallery.open(g)) as gallery:
        ids = set(gallery._all()[0].tolist())
    # ROOT moved, an identity renamed, a moved picture there twice (one face each)
    people.rename(tmp_path / "people2")
    people = tmp_path / "people2"
    (people / "bob").rename(people / "rob")
    shutil.copy(people / "ann" / "1.pgm", people / "ann" / "3.pgm")
    res = run("enroll", str(people), "--index", str(g), "--no-gate", "--prune", "-o", str(m))
    assert res.returncode == 0, res.stderr
    assert "4 moved" in res.stderr
    decisions = {(r["identity"], Path(r["path"]).name): r["decision"] for r in rows(m)}
    assert decisions == {("ann", "1.pgm"): "moved", ("ann", "2.pgm"): "moved",
                         ("rob", "1.pgm"): "moved", ("rob", "2.pgm"): "moved",
                         ("ann", "3.pgm"): "enroll"}
    assert all("moved from" in r["reason"] for r in rows(m) if r["decision"] == "moved")
    with contextlib.closing(Gallery.open(g)) as gallery:
        assert gallery.identities() == {"ann": 3, "rob": 2}
        assert ids == {int(r["face_id"]) for r in rows(m) if r["decision"] == "moved"}
        assert gallery.sources("rob") == {str(people.resolve() / "rob" / f"{i}.pgm")
                                          for i in (1, 2)}


def test_enroll_says_what_it_did_not_enroll_and_why(tmp_path, orl_root):
    people = tmp_path / "people"
    (people / "ann").mkdir(parents=True)
    shutil.copy(orl_root / "s34" / "1.pgm", people / "ann" / "1.pgm")
    shutil.copy(orl_root / "s34" / "2.pgm", people / "ann" / "2.pgm")
    (people / "ann" / "3.jpg").write_bytes(b"not a picture")
    # detector confidence, calibrated: an ORL face is about 0.9, so 0.99 rejects them
    res = run("enroll", str(people), "--index", str(tmp_path / "g"), "--threshold", "0.99",
              "--scorer", "detector-confidence")
    assert res.returncode == 1
    assert "2 rejected by the gate, 1 failed" in res.stderr
    assert "not enrolled:" in res.stderr and "3.jpg" in res.stderr
    assert "-o FILE lists every file" in res.stderr


def _ann_and_bob(people: Path, orl_root: Path, soften: bool = False) -> None:
    """Two people of three ORL pictures each; `soften`: pictures 1 and 3 blurred (PNG),
    so that which is best is not the file order."""
    for who, s in (("ann", 34), ("bob", 35)):
        (people / who).mkdir(parents=True)
        for i in (1, 2, 3):
            if not soften:
                shutil.copy(orl_root / f"s{s}" / f"{i}.pgm", people / who / f"{i}.pgm")
                continue
            img = Image.open(orl_root / f"s{s}" / f"{i}.pgm")
            img = img if i == 2 else img.filter(ImageFilter.GaussianBlur(1.0 + i / 2))
            img.save(people / who / f"{i}.png")


def test_enroll_best_keeps_each_identitys_best_pictures_only(tmp_path, orl_root):
    people, g, m = tmp_path / "people", tmp_path / "g", tmp_path / "m.csv"
    _ann_and_bob(people, orl_root, soften=True)
    raw = {Path(r["path"]).relative_to(people).as_posix(): float(r["raw_score"])
           for r in csv.DictReader(run("score", str(people)).stdout.splitlines())}
    res = run("enroll", str(people), "--index", str(g), "--best", "1", "--threshold", "0",
              "-o", str(m))
    assert res.returncode == 0, res.stderr
    assert "4 not among the 1 best" in res.stderr
    table = rows(m)
    chosen = {r["identity"]: Path(r["path"]).relative_to(people).as_posix()
              for r in table if r["decision"] == "enroll"}
    assert chosen == {who: max((p for p in raw if p.startswith(who)), key=raw.get)
                      for who in ("ann", "bob")}
    assert all(r["reason"].startswith(f"not among {r['identity']}'s 1 best")
               for r in table if r["decision"] == "skip")
    # an identity holding its N faces gets no more; a larger N adds the next best
    res = run("enroll", str(people), "--index", str(g), "--best", "1", "--threshold", "0")
    assert res.returncode == 0 and "enrolled 0 faces" in res.stderr
    res = run("enroll", str(people), "--index", str(g), "--best", "2", "--threshold", "0",
              "-o", str(m))
    assert res.returncode == 0 and "enrolled 2 faces" in res.stderr
    second = {r["identity"]: Path(r["path"]).relative_to(people).as_posix()
              for r in rows(m) if r["decision"] == "enroll"}
    assert second == {who: sorted((p for p in raw if p.startswith(who)), key=raw.get)[1]
                      for who in ("ann", "bob")}
    res = run("enroll", str(people), "--index", str(g), "--best", "1", "--no-gate")
    assert res.returncode == 2 and "needs the gate" in res.stderr


def test_the_best_of_n_example_runs_the_commands_end_to_end(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "best_of_n_enrollment.py"
    done = subprocess.run([sys.executable, str(example), str(tmp_path / "w"), "--draws",
                           "2", "--variants", "1"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = {line.split(":")[0].strip(): float(line.split(":")[1].split()[-1]
                                                 if "mean" not in line else
                                                 line.split("mean")[1].split(",")[0])
               for line in done.stdout.splitlines()[1:]}
    best = figures["enroll --best 1 (the student's pick)"]
    assert 0.9 <= best <= 1.0  # clean probes of ten people, each one's best picture
    assert best >= figures["a random pick (2 draws)"]


def test_enroll_best_counts_only_faces_whose_picture_is_there(tmp_path, orl_root):
    # a renamed best picture, or a copy of the chosen one, had left an identity without
    # its N faces (second audit of 2026-12-07)
    people, g, m = tmp_path / "people", tmp_path / "g", tmp_path / "m.csv"
    (people / "ann").mkdir(parents=True)
    for i in (1, 2, 3):
        img = Image.open(orl_root / "s34" / f"{i}.pgm")
        img = img if i == 2 else img.filter(ImageFilter.GaussianBlur(1.0 + i / 2))
        img.save(people / "ann" / f"{i}.png")
    shutil.copy(people / "ann" / "2.png", people / "ann" / "2copy.png")
    res = run("enroll", str(people), "--index", str(g), "--best", "2", "--threshold", "0",
              "-o", str(m))
    assert res.returncode == 0, res.stderr
    decisions = {Path(r["path"]).name: (r["decision"], r["reason"]) for r in rows(m)}
    enrolled = sorted(n for n, (d, _) in decisions.items() if d == "enroll")
    assert len(enrolled) == 2 and not {"2.png", "2copy.png"} <= set(enrolled)
    copy = ({"2.png", "2copy.png"} - set(enrolled)).pop()
    assert decisions[copy] == ("skip", "a copy of a picture chosen above")
    (people / "ann" / enrolled[0]).rename(people / "ann" / "renamed.png")
    (people / "ann" / copy).unlink()
    res = run("enroll", str(people), "--index", str(g), "--best", "2", "--threshold", "0",
              "--prune", "-o", str(m))
    assert res.returncode == 0, res.stderr
    assert [r["decision"] for r in rows(m) if Path(r["path"]).name == "renamed.png"] == [
        "moved"]
    assert "(2 faces in the gallery)" in res.stderr


def test_a_manifest_appended_through_stdout_keeps_the_earlier_rows(tmp_path, orl_root):
    # `-o /dev/stdout >> all.csv` emptied the file the shell was appending to
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(orl_root / "s34" / "1.pgm", d / "1.pgm")
    out = tmp_path / "all.csv"
    for _ in range(2):
        with open(out, "ab") as fh:
            subprocess.run([*FIQA, "score", str(d), "-o", "/dev/stdout"], stdout=fh,
                           timeout=600, check=True)
    assert out.read_text().count("1.pgm") == 2
    # and an enroll manifest of an older version (no `faces` column) is rewritten
    old = tmp_path / "old.csv"
    old.write_text("path,identity,decision,score,reason,error,face_id\nx,a,enroll,,,,1\n")
    (tmp_path / "people" / "ann").mkdir(parents=True)
    shutil.copy(orl_root / "s34" / "1.pgm", tmp_path / "people" / "ann" / "1.pgm")
    assert run("enroll", str(tmp_path / "people"), "--index", str(tmp_path / "g"),
               "--no-gate", "-o", str(old)).returncode == 0
    assert [r["decision"] for r in rows(old)] == ["enroll"]


def test_enroll_best_gives_a_copy_of_an_enrolled_picture_no_place(tmp_path, orl_root):
    people, g, m = tmp_path / "people", tmp_path / "g", tmp_path / "m.csv"
    (people / "ann").mkdir(parents=True)
    shutil.copy(orl_root / "s34" / "1.pgm", people / "ann" / "1.pgm")
    assert run("enroll", str(people), "--index", str(g), "--best", "2", "--threshold",
               "0").returncode == 0
    shutil.copy(people / "ann" / "1.pgm", people / "ann" / "1_copy.pgm")
    # a softened other picture: the copy scores higher, yet it is the same picture
    Image.open(orl_root / "s34" / "2.pgm").filter(ImageFilter.GaussianBlur(2)).save(
        people / "ann" / "2.png")
    res = run("enroll", str(people), "--index", str(g), "--best", "2", "--threshold", "0",
              "-o", str(m))
    assert res.returncode == 0, res.stderr
    decisions = {Path(r["path"]).name: r["decision"] for r in rows(m)}
    assert decisions == {"1.pgm": "skip", "1_copy.pgm": "skip", "2.png": "enroll"}
    assert "(2 faces in the gallery)" in res.stderr


def test_enroll_best_replaces_a_face_its_prune_removes(tmp_path, orl_root):
    # the enrolled picture, now a copy under a second identity, is stale and pruned: it
    # had still held its identity's only place, which was left empty (third audit)
    people, g, m = tmp_path / "people", tmp_path / "g", tmp_path / "m.csv"
    _ann_and_bob(people, orl_root)
    assert run("enroll", str(people), "--index", str(g), "--best", "1", "--threshold", "0",
               "-o", str(m)).returncode == 0
    (ann,) = [r["path"] for r in rows(m) if r["identity"] == "ann" and r["decision"] ==
              "enroll"]
    shutil.copy(ann, people / "bob" / "misfiled.pgm")
    # kept without --prune, the face still holds its place: no second one (fourth audit)
    assert run("enroll", str(people), "--index", str(g), "--best", "1", "--threshold",
               "0").returncode == 0
    from fiqa_gate.gallery import Gallery

    with contextlib.closing(Gallery.open(g)) as gallery:
        assert gallery.identities() == {"ann": 1, "bob": 1}
    res = run("enroll", str(people), "--index", str(g), "--best", "1", "--threshold", "0",
              "--prune", "-o", str(m))
    assert res.returncode == 0, res.stderr
    with contextlib.closing(Gallery.open(g)) as gallery:
        assert gallery.identities() == {"ann": 1, "bob": 1}
        assert _where_str(ann) not in gallery.sources("ann")


def _where_str(path: str) -> str:
    return str(Path(path).resolve())


def test_enroll_embeds_a_changed_file_again(tmp_path, orl_root):
    """Two misfiled pictures swapped back under the same names: their faces follow the
    files' new content (a face had been keyed by its path alone, so bob's probe matched
    ann; gallery audit of 2026-12-08). A changed file the gate now rejects leaves its old
    face stale, and --prune removes it."""
    from fiqa_gate.gallery import Gallery

    people, g, m = tmp_path / "people", tmp_path / "g", tmp_path / "m.csv"
    for who, s in (("ann", "s31"), ("bob", "s32")):
        (people / who).mkdir(parents=True)
        shutil.copy(orl_root / s / "1.pgm", people / who / "IMG_0001.pgm")
    shutil.copy(orl_root / "s32" / "2.pgm", people / "ann" / "IMG_0002.pgm")  # misfiled
    shutil.copy(orl_root / "s31" / "2.pgm", people / "bob" / "IMG_0002.pgm")
    shutil.copy(orl_root / "s31" / "3.pgm", people / "ann" / "IMG_0003.pgm")
    assert run("enroll", str(people), "--index", str(g)).returncode == 0
    a, b = people / "ann" / "IMG_0002.pgm", people / "bob" / "IMG_0002.pgm"
    swap = tmp_path / "swap"
    a.rename(swap), b.rename(a), swap.rename(b)
    # and a picture replaced by one the gate rejects: its old face is no one's picture now
    Image.new("L", (92, 112), 128).save(people / "ann" / "IMG_0003.pgm")
    res = run("enroll", str(people), "--index", str(g), "-o", str(m))
    assert res.returncode == 1, res.stderr  # the grey picture has no face
    assert "2 embedded again (their files changed)" in res.stderr, res.stderr
    assert "1 enrolled faces come from files that changed" in res.stderr, res.stderr
    by_path = {Path(r["path"]).relative_to(people).as_posix(): r for r in rows(m)}
    assert by_path["ann/IMG_0002.pgm"]["decision"] == "replaced"
    assert by_path["bob/IMG_0002.pgm"]["decision"] == "replaced"
    assert by_path["ann/IMG_0001.pgm"]["decision"] == "skip"
    assert [r["decision"] for r in rows(m) if r["path"].endswith("IMG_0003.pgm")] == \
        ["error", "stale"]
    probe = tmp_path / "probe_bob.pgm"
    shutil.copy(orl_root / "s32" / "5.pgm", probe)
    hits = tmp_path / "hits.csv"
    assert run("search", str(probe), "--index", str(g), "-k", "2", "-o", str(hits)
               ).returncode == 0
    assert [r["identity"] for r in rows(hits)] == ["bob", "bob"]
    with contextlib.closing(Gallery.open(g)) as gallery:
        assert len(gallery) == 5
    assert run("enroll", str(people), "--index", str(g), "--prune").returncode == 1
    with contextlib.closing(Gallery.open(g)) as gallery:
        assert gallery.identities() == {"ann": 2, "bob": 2}
    # an unchanged gallery is not embedded again
    res = run("enroll", str(people), "--index", str(g), "--prune")
    assert "embedded again" not in res.stderr and "4 already there" in res.stderr, res.stderr


def test_a_gallery_from_before_fingerprints_is_kept_as_it_is(tmp_path, orl_root):
    """A gallery made before faces kept their file's fingerprint gets the column on its
    next enroll; its faces are not embedded again (nothing says their files changed)."""
    import sqlite3

    from fiqa_gate.gallery import Gallery

    people, g = tmp_path / "people", tmp_path / "g"
    (people / "ann").mkdir(parents=True)
    for i in (1, 2):
        shutil.copy(orl_root / "s33" / f"{i}.pgm", people / "ann" / f"{i}.pgm")
    assert run("enroll", str(people), "--index", str(g)).returncode == 0
    with contextlib.closing(sqlite3.connect(g / "meta.sqlite")) as db:
        db.execute("ALTER TABLE faces DROP COLUMN fingerprint")
        db.commit()
    shutil.copy(orl_root / "s34" / "1.pgm", people / "ann" / "1.pgm")
    res = run("enroll", str(people), "--index", str(g))
    assert res.returncode == 0 and "2 already there" in res.stderr, res.stderr
    with contextlib.closing(Gallery.open(g)) as gallery:
        assert set(gallery.fingerprints("ann").values()) == {None}


def test_forget_removes_a_person_and_erases_their_embeddings(tmp_path, orl_root):
    """A deleted identity folder kept its faces and no command removed them (gallery
    audit of 2026-12-08): enroll now names such identities, and `forget` removes them,
    leaving no byte of their embeddings in the gallery's files."""
    import sqlite3

    from fiqa_gate.gallery import Gallery

    people, g = tmp_path / "people", tmp_path / "g"
    for who, s in (("ann", "s31"), ("bob", "s32")):
        (people / who).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(orl_root / s / f"{i}.pgm", people / who / f"{i}.pgm")
    assert run("enroll", str(people), "--index", str(g)).returncode == 0
    with contextlib.closing(sqlite3.connect(g / "meta.sqlite")) as db:
        bob = [e for (e,) in db.execute("SELECT embedding FROM faces WHERE identity = 'bob'")]
    assert len(bob) == 2
    shutil.rmtree(people / "bob")
    res = run("enroll", str(people), "--index", str(g))
    assert res.returncode == 0 and "1 identities in the gallery have no folder" in res.stderr \
        and "(bob)" in res.stderr, res.stderr
    res = run("forget", "bob", "carl", "--index", str(g))
    assert res.returncode == 2 and "no faces of 'carl'" in res.stderr, res.stderr
    # a service that keeps the gallery open: its connection had kept the removed
    # embeddings in the write-ahead log (third audit of 2026-12-08)
    reader = Gallery.open(g)
    assert len(reader) == 4
    res = run("forget", "bob", "--index", str(g))
    assert res.returncode == 0 and "removed 2 faces of 1 identities" in res.stderr, res.stderr
    stored = b"".join(p.read_bytes() for p in g.iterdir() if p.is_file())
    for e in bob:
        assert e[:64] not in stored  # the database, its log and the index
    reader.close()
    with contextlib.closing(Gallery.open(g)) as gallery:
        assert gallery.identities() == {"ann": 2}
    probe, hits = tmp_path / "probe.pgm", tmp_path / "hits.csv"
    shutil.copy(orl_root / "s32" / "5.pgm", probe)
    assert run("search", str(probe), "--index", str(g), "-o", str(hits)).returncode == 0
    assert {r["identity"] for r in rows(hits)} == {"ann"}
    # the probe gate's threshold does nothing without the gate: said, not ignored
    res = run("search", str(probe), "--index", str(g), "--threshold", "0.9")
    assert res.returncode == 2 and "it needs --gate" in res.stderr, res.stderr


def test_file_manager_clutter_and_gallery_folders_are_not_inputs(tmp_path, orl_root):
    """.DS_Store, ._* and Thumbs.db failed every enroll (exit 1 each day), and `filter
    --move` over a folder holding a gallery moved the gallery away as failed inputs
    (gallery audit of 2026-12-08)."""
    people, site = tmp_path / "people", tmp_path / "site"
    (people / "ann").mkdir(parents=True)
    shutil.copy(orl_root / "s31" / "1.pgm", people / "ann" / "1.pgm")
    (people / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    for name in (".DS_Store", "._1.pgm", "Thumbs.db"):
        (people / "ann" / name).write_bytes(os.urandom(2000))
    g = site / "gallery"
    res = run("enroll", str(people), "--index", str(g))
    assert res.returncode == 0 and "failed" not in res.stderr, res.stderr
    assert "skipped" not in res.stderr, res.stderr
    shutil.copy(orl_root / "s31" / "2.pgm", site / "probe.pgm")
    before = digests(g)
    m = tmp_path / "m.csv"
    res = run("filter", str(site), "--accepted-dir", str(tmp_path / "ok"), "--rejected-dir",
              str(tmp_path / "bad"), "--move", "-o", str(m))
    assert res.returncode == 0 and "folders skipped: fiqa-gate galleries" in res.stderr, \
        res.stderr
    assert [Path(r["path"]).name for r in rows(m)] == ["probe.pgm"]
    assert digests(g) == before
    hits = tmp_path / "hits.csv"
    assert run("search", str(site), "--index", str(g), "-o", str(hits)).returncode == 0
    assert {Path(r["path"]).name for r in rows(hits)} <= {"probe.pgm"}


def test_enroll_says_which_pictures_hold_several_faces(tmp_path, sample_photo, orl_root):
    # a group photo in a person's folder had been enrolled without a word (audit 2026-12-08)
    people = tmp_path / "people"
    (people / "ann").mkdir(parents=True)
    shutil.copy(sample_photo, people / "ann" / "party.jpg")
    shutil.copy(orl_root / "s31" / "1.pgm", people / "ann" / "1.pgm")
    res = run("enroll", str(people), "--index", str(tmp_path / "g"), "--no-gate")
    assert res.returncode == 0, res.stderr
    assert "1 pictures hold more than one face" in res.stderr and "party.jpg" in res.stderr, \
        res.stderr


def test_filter_move_leaves_a_folder_linked_in_from_outside_the_input(tmp_path, orl_root):
    # a link to a folder beside the input had its files moved away (gallery audit of
    # 2026-12-08): they are copied, and the folder outside keeps them
    top = tmp_path / "top"
    (top / "in").mkdir(parents=True)
    (top / "archive").mkdir()
    shutil.copy(orl_root / "s31" / "1.pgm", top / "in" / "a.pgm")
    shutil.copy(orl_root / "s32" / "1.pgm", top / "archive" / "precious.pgm")
    (top / "in" / "archive_link").symlink_to("../archive")
    before = digests(top / "archive")
    res = run("filter", str(top / "in"), "--accepted-dir", str(tmp_path / "ok"),
              "--rejected-dir", str(tmp_path / "bad"), "--move", "-o", str(tmp_path / "m.csv"))
    assert res.returncode == 0, res.stderr
    assert "1 copied, not moved (in folders linked in from outside the input)" in res.stderr
    assert digests(top / "archive") == before
    assert not (top / "in" / "a.pgm").exists()  # the input's own file is moved
    copies = list((tmp_path / "ok").rglob("*.pgm")) + list((tmp_path / "bad").rglob("*.pgm"))
    assert sorted(p.name for p in copies) == ["a.pgm", "precious.pgm"]


def test_enroll_best_keeps_n_faces_when_an_enrolled_file_changes(tmp_path, orl_root):
    # an enrolled picture replaced by a blurred copy, which the gate rejects: its old face
    # is kept (stale) and had let a third picture in under --best 2 (third audit of
    # 2026-12-08); with --prune it goes, and the next best takes its place
    from fiqa_gate.gallery import Gallery

    people, g, m = tmp_path / "people", tmp_path / "g", tmp_path / "m.csv"
    orl_people(people, orl_root, ("s31",), pictures=(1, 2, 3, 4, 5))
    assert run("enroll", str(people), "--index", str(g), "--best", "2", "-o", str(m)
               ).returncode == 0
    first = [r["path"] for r in rows(m) if r["decision"] == "enroll"]
    assert len(first) == 2
    with Image.open(first[0]) as im:
        im.filter(ImageFilter.GaussianBlur(8)).save(first[0], format="PPM")
    res = run("enroll", str(people), "--index", str(g), "--best", "2", "-o", str(m))
    assert res.returncode == 0, res.stderr
    assert [r["decision"] for r in rows(m) if r["path"] == first[0]] == ["reject", "stale"]
    with contextlib.closing(Gallery.open(g)) as gallery:
        assert gallery.identities() == {"s31": 2}
    res = run("enroll", str(people), "--index", str(g), "--best", "2", "--prune")
    assert res.returncode == 0 and "1 removed" in res.stderr, res.stderr
    with contextlib.closing(Gallery.open(g)) as gallery:
        assert gallery.identities() == {"s31": 2}
        assert _where_str(first[0]) not in gallery.sources("s31")
