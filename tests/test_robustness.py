"""`filter` copies never overwrite a file that is already at the destination.

(The bad-input corpus, kills and resumes are in test_bad_inputs.py and
test_resume_kill.py.)"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCORER = ["--scorer", "sharpness"]  # the gate under test is the pipeline, not a model


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fiqa_gate", *args], capture_output=True,
                          timeout=timeout)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def test_existing_destination_is_never_overwritten(tmp_path, orl_root):
    src = tmp_path / "in"
    src.mkdir()
    (src / "1.pgm").write_bytes((orl_root / "s38" / "1.pgm").read_bytes())
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "1.pgm").write_bytes(b"someone else's file")
    done = _run("filter", str(src), "-o", str(tmp_path / "m.csv"), "--accepted-dir", str(ok),
                "--threshold", "0", *SCORER)
    assert done.returncode == 1
    assert (ok / "1.pgm").read_bytes() == b"someone else's file"
    assert "not overwritten" in _rows(tmp_path / "m.csv")[0]["error"]


def test_target_folders_inside_the_input_are_not_read_again(tmp_path, orl_root):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "..sub").mkdir()  # a name, not the parent: its files keep their sub-folder
    for name in ("a.pgm", "sub/b.pgm", "..sub/a.pgm"):
        (src / name).write_bytes((orl_root / "s38" / "1.pgm").read_bytes())
    args = ["filter", str(src), "--accepted-dir", str(src / "ok"), "--rejected-dir",
            str(src / "bad"), "--threshold", "0", "--move", *SCORER]
    assert _run(*args, "-o", str(tmp_path / "m1.csv")).returncode == 0
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*.pgm")) == [
        "ok/..sub/a.pgm", "ok/a.pgm", "ok/sub/b.pgm"]
    # a second run finds nothing new: its own copies are not inputs, nothing nests
    assert _run(*args, "-o", str(tmp_path / "m2.csv")).returncode == 0
    assert _rows(tmp_path / "m2.csv") == []
    # an input inside a target folder would be skipped whole: refused instead
    done = _run("filter", str(src / "ok"), "--accepted-dir", str(src), *SCORER)
    assert done.returncode == 2 and b"is inside a target folder" in done.stderr
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*.pgm")) == [
        "ok/..sub/a.pgm", "ok/a.pgm", "ok/sub/b.pgm"]


def test_a_move_interrupted_after_its_copy_finishes_on_the_rerun(tmp_path, orl_root):
    src, ok = tmp_path / "in", tmp_path / "ok"
    src.mkdir()
    ok.mkdir()
    name = "x" * 240 + ".pgm"  # a long name: the temporary copy's name must still fit
    face = (orl_root / "s38" / "1.pgm").read_bytes()
    (src / name).write_bytes(face)
    (src / "other.pgm").write_bytes(face)
    (ok / "other.pgm").write_bytes(face)  # copied and synced, then killed before the unlink
    done = _run("filter", str(src), "-o", str(tmp_path / "m.csv"), "--accepted-dir", str(ok),
                "--threshold", "0", "--move", *SCORER)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in src.iterdir()) == []
    assert sorted(p.name for p in ok.iterdir()) == sorted([name, "other.pgm"])
    assert (ok / name).read_bytes() == face
    copied = {Path(r["path"]).name: r["copied_to"] for r in _rows(tmp_path / "m.csv")}
    assert copied["other.pgm"].endswith("(moved (was already present))")
    assert copied[name].endswith("(moved)")


def test_a_move_onto_a_link_back_to_the_source_keeps_the_source(tmp_path, orl_root):
    src, ok = tmp_path / "in", tmp_path / "ok"
    (src / "sub").mkdir(parents=True)
    ok.mkdir()
    face = (orl_root / "s38" / "1.pgm").read_bytes()
    (src / "a.pgm").write_bytes(face)
    (src / "sub" / "b.pgm").write_bytes(face)
    (ok / "a.pgm").symlink_to(src / "a.pgm")  # the destination is the source itself
    (ok / "sub").symlink_to(src / "sub")
    done = _run("filter", str(src), "-o", str(tmp_path / "m.csv"), "--accepted-dir", str(ok),
                "--threshold", "0", "--move", *SCORER)
    assert done.returncode == 0, done.stderr
    assert (src / "a.pgm").read_bytes() == face and (src / "sub" / "b.pgm").read_bytes() == face
    assert all("it is the source itself" in r["copied_to"] for r in _rows(tmp_path / "m.csv"))


def test_the_run_s_own_manifest_and_a_file_named_twice_are_one_input_each(tmp_path, orl_root):
    src, bad = tmp_path / "in", tmp_path / "bad"
    src.mkdir()
    (src / "a.pgm").write_bytes((orl_root / "s38" / "1.pgm").read_bytes())
    manifest = src / "m.csv"  # the manifest lives in the input folder
    for resume in ([], ["--resume"]):
        done = _run("filter", str(src), str(src / "a.pgm"), "-o", str(manifest),
                    "--rejected-dir", str(bad), "--accepted-dir", str(tmp_path / "ok"),
                    "--move", "--threshold", "0", *SCORER, *resume)
        assert done.returncode == 0, done.stderr
    assert manifest.is_file() and not bad.exists()
    assert [Path(r["path"]).name for r in _rows(manifest)] == ["a.pgm"]


def test_partial_copies_of_a_killed_run_are_removed_and_a_live_run_s_are_not(
        tmp_path, orl_root, monkeypatch):
    import os

    from fiqa_gate import assets
    from fiqa_gate.assets import _alive, _host_tag

    src, ok = tmp_path / "in", tmp_path / "ok"
    src.mkdir()
    ok.mkdir()
    (src / "a.pgm").write_bytes((orl_root / "s38" / "1.pgm").read_bytes())
    dead = next(p for p in range(4_000_000, 4_100_000) if not _alive(p))
    # killed a moment ago on this machine, in this pid namespace: gone at once
    (ok / f".fiqa-{_host_tag()}-{dead}-x4aaaaaa.part").write_bytes(b"half a copy")
    live = f".fiqa-{_host_tag()}-{os.getpid()}-x5aaaaaa.part"  # a live run's, here
    foreign = [f".fiqa-{dead}-x1aaaaaa.part",  # no tag (an earlier version): whose pid?
               f".fiqa-{os.getpid()}-x2aaaaaa.part",
               f".fiqa-0badc0de-{dead}-x6aaaaaa.part",  # another machine or namespace
               ".fiqa-0badc0de-1-x7aaaaaa.part",  # its pid 1 is not ours
               f".fiqa-xxxxxxxx-{dead}-x8aaaaaa.part"]  # a writer that had no /proc
    never = [".fiqa-99999999999999999999-xaaaaaaa.part", ".fiqa-²-xaaaaaaa.part",
             ".fiqa-123-holiday.part"]  # not pids, or not our names
    for name in [live, *foreign, *never]:
        (ok / name).write_bytes(b"in flight")
    (ok / f".fiqa-{dead}-diraaaaa.part").mkdir()  # not a file: left alone
    done = _run("filter", str(src), "-o", str(tmp_path / "m.csv"), "--accepted-dir", str(ok),
                "--threshold", "0", *SCORER)
    assert done.returncode == 0, done.stderr
    left = sorted([live, *foreign, *never, f".fiqa-{dead}-diraaaaa.part", "a.pgm"])
    assert sorted(p.name for p in ok.iterdir()) == left
    # An hour on, unchanged (by ctime: a copy is given its source's old mtime), the others'
    # go whatever their pid says here; a live writer's here stays.
    monkeypatch.setattr(assets.time, "time", lambda: os.stat(ok / live).st_ctime + 3700)
    assets._cleaned.clear()
    assets.remove_dead_temps(ok)
    assert sorted(p.name for p in ok.iterdir()) == sorted(set(left) - set(foreign))


def test_a_move_onto_a_hard_link_finishes_and_onto_a_link_to_another_file_does_not(
        tmp_path, orl_root):
    import os

    src, ok = tmp_path / "in", tmp_path / "ok"
    src.mkdir()
    ok.mkdir()
    face = (orl_root / "s38" / "1.pgm").read_bytes()
    for name in ("a.pgm", "b.pgm", "c.pgm"):
        (src / name).write_bytes(face)
    os.link(src / "a.pgm", ok / "a.pgm")  # a second name of the same data
    (ok / "b.pgm").symlink_to(src / "c.pgm")  # the same bytes, but another input's name
    done = _run("filter", str(src), "-o", str(tmp_path / "m.csv"), "--accepted-dir", str(ok),
                "--threshold", "0", "--move", *SCORER)
    assert done.returncode == 1
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "m.csv")}
    assert rows["a.pgm"]["copied_to"].endswith("(moved (was already present))")
    assert "is a link to another file" in rows["b.pgm"]["error"]
    assert (ok / "a.pgm").read_bytes() == face and not (src / "a.pgm").exists()
    assert (src / "b.pgm").read_bytes() == face and (ok / "c.pgm").read_bytes() == face


def test_a_source_replaced_while_it_was_copied_is_kept(tmp_path):
    import os

    import pytest

    from fiqa_gate.cli import _check_unchanged

    src = tmp_path / "a.pgm"
    src.write_bytes(b"old version")
    copied = os.stat(src)  # what the copy read
    (tmp_path / "new").write_bytes(b"NEW VERSION")
    os.replace(tmp_path / "new", src)  # another program saves over the name mid-copy
    with pytest.raises(FileExistsError, match="changed while it was copied"):
        _check_unchanged(str(src), copied)
    assert src.read_bytes() == b"NEW VERSION"
    _check_unchanged(str(src), os.stat(src))  # unchanged: may be removed


def test_stdout_redirected_into_the_input_is_not_an_input(tmp_path, orl_root):
    src = tmp_path / "in"
    (tmp_path / "x").mkdir()
    src.mkdir()
    (src / "a.pgm").write_bytes((orl_root / "s38" / "1.pgm").read_bytes())
    (src / "sub").symlink_to(tmp_path / "x")  # in/sub/../a.pgm is x/../a.pgm, not in/a.pgm
    (tmp_path / "a.pgm").write_bytes((orl_root / "s38" / "2.pgm").read_bytes())
    with open(src / "0-run.csv", "wb") as out:  # sorts before the image
        done = subprocess.run([sys.executable, "-m", "fiqa_gate", "filter", str(src),
                               str(src / "sub" / ".." / "a.pgm"), "--rejected-dir",
                               str(tmp_path / "rej"), "--accepted-dir", str(tmp_path / "ok"),
                               "--move", "--threshold", "0", *SCORER], stdout=out,
                              stderr=subprocess.PIPE, timeout=600)
    rows = {r["path"]: r for r in _rows(src / "0-run.csv")}
    assert sorted(rows) == sorted([str(src / "a.pgm"), str(src / "sub" / ".." / "a.pgm")])
    assert not (tmp_path / "rej").exists()  # the manifest stayed where it is written
    # two files, one destination name: the second is not copied over the first, nor moved
    assert done.returncode == 1
    assert "other content" in rows[str(src / "sub" / ".." / "a.pgm")]["error"]
    assert (tmp_path / "a.pgm").is_file() and (tmp_path / "ok" / "a.pgm").is_file()


def test_a_resume_with_the_folder_spelled_another_way_redoes_nothing(tmp_path, orl_root):
    import os

    src = tmp_path / "in"
    src.mkdir()
    for i in (1, 2):
        (src / f"{i}.pgm").write_bytes((orl_root / "s38" / f"{i}.pgm").read_bytes())
    manifest = tmp_path / "m.csv"
    assert _run("filter", str(src / "1.pgm"), "-o", str(manifest), *SCORER).returncode == 0
    relative = os.path.relpath(src, tmp_path / "in")  # "." from inside the folder
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "filter", relative, "-o",
                           str(manifest), "--resume", *SCORER], capture_output=True,
                          cwd=src, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(Path(r["path"]).name for r in _rows(manifest)) == ["1.pgm", "2.pgm"]


def test_a_resumed_filter_copies_what_could_not_be_copied_before(tmp_path, orl_root):
    # A copy that failed (here a file stands where a sub-folder must go; a full disk
    # alike) is not done: --resume copies it once the way is clear, one row per input.
    src, ok = tmp_path / "in", tmp_path / "ok"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        for i in (1, 2):
            (src / sub / f"{i}.pgm").write_bytes((orl_root / "s38" / f"{i}.pgm").read_bytes())
    ok.mkdir()
    (ok / "b").write_bytes(b"in the way")
    args = ["filter", str(src), "-o", str(tmp_path / "m.csv"), "--accepted-dir", str(ok),
            "--threshold", "0", "--move", *SCORER]
    assert _run(*args).returncode == 1
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pgm")) == [
        "in/b/1.pgm", "in/b/2.pgm", "ok/a/1.pgm", "ok/a/2.pgm"]
    (ok / "b").unlink()
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(manifest.read_bytes().replace(b"\n", b"\n\n", 2))  # blank lines
    before = manifest.read_bytes()
    refused = _run(*[a if a != "0" else "0.3" for a in args], "--resume")
    assert refused.returncode == 2 and manifest.read_bytes() == before  # changes nothing
    done = _run(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pgm")) == [
        "ok/a/1.pgm", "ok/a/2.pgm", "ok/b/1.pgm", "ok/b/2.pgm"]
    rows = _rows(tmp_path / "m.csv")
    assert sorted(Path(r["path"]).relative_to(src).as_posix() for r in rows) == [
        "a/1.pgm", "a/2.pgm", "b/1.pgm", "b/2.pgm"]
    assert all(r["copied_to"].endswith("(moved)") and not r["error"] for r in rows)


def test_a_full_disk_under_the_manifest_is_a_clear_error_and_resume_finishes(tmp_path,
                                                                           orl_root):
    from conftest import small_filesystem

    with small_filesystem(tmp_path / "small", "4k") as small:
        src, ok = tmp_path / "in", tmp_path / "ok"
        for s in ("s31", "s32", "s33", "s34", "s35", "s36"):
            (src / s).mkdir(parents=True)
            for i in range(1, 8):
                (src / s / f"{i}.pgm").write_bytes((orl_root / s / f"{i}.pgm").read_bytes())
        args = ["filter", str(src), "-o", str(small / "m.csv"), "--accepted-dir", str(ok),
                "--threshold", "0", "--move", *SCORER]
        done = _run(*args)
        # 42 rows of about 150 bytes do not fit in 4 KiB: the run stops and says why; the
        # file whose row could not be written stays where it was (and is copied)
        assert done.returncode == 2
        err = done.stderr.decode()
        assert "cannot write the manifest" in err and "No space left on device" in err
        assert "Traceback" not in err
        # every input is in its place or its copy's, and the one whose row could not be
        # written is in both
        placed = [p.relative_to(p.parents[1]).as_posix() for p in tmp_path.rglob("*.pgm")]
        assert len(set(placed)) == 42 and len(placed) == 43
        subprocess.run(["mount", "-o", "remount,size=64k", str(small)], check=True)
        done = _run(*args, "--resume")
        assert done.returncode == 0, done.stderr
        assert not list(src.rglob("*.pgm")) and len(list(ok.rglob("*.pgm"))) == 42
        rows = _rows(small / "m.csv")
        assert len(rows) == len({r["path"] for r in rows}) == 42  # every input once
        assert all("(moved" in r["copied_to"] for r in rows)


def test_ctrl_c_exits_130_without_a_traceback_and_resume_finishes(tmp_path, orl_root):
    import signal
    import time

    src = tmp_path / "in"
    for s in (f"s{n}" for n in range(1, 41)):  # all 400: 40 had finished before the signal
        (src / s).mkdir(parents=True)
        for i in range(1, 11):
            (src / s / f"{i}.pgm").write_bytes((orl_root / s / f"{i}.pgm").read_bytes())
    manifest = tmp_path / "m.csv"
    args = [sys.executable, "-m", "fiqa_gate", "filter", str(src), "-o", str(manifest),
            "--threshold", "0.5", *SCORER]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not manifest.exists() or manifest.read_text().count("\n") < 3) \
            and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert proc.returncode == 130 and b"Interrupted." in err and b"Traceback" not in err
    done = _run(*args[3:], "--resume")
    assert done.returncode == 0, done.stderr
    rows = _rows(manifest)
    assert len(rows) == len({r["path"] for r in rows}) == 400


def test_a_move_recorded_but_cut_short_is_finished_by_the_resumed_run(tmp_path, orl_root):
    # killed after the row saying "moved" was written, before the source was removed:
    # the resumed run removes it when its copy is complete; it keeps a source whose
    # recorded copy is missing, is the source itself (a link back) or lies outside the
    # target folders, and files that are not this run's inputs
    src, ok, other = tmp_path / "in", tmp_path / "ok", tmp_path / "other"
    for d in (src, ok, other):
        d.mkdir()
    face = (orl_root / "s38" / "1.pgm").read_bytes()
    for name in ("a.pgm", "b.pgm", "c.pgm", "d.pgm", "e.pgm"):
        (src / name).write_bytes(face)
    (other / "keep.pgm").write_bytes(face)
    (ok / "a.pgm").write_bytes(face)  # a's copy is complete; b's is missing
    (ok / "c.pgm").write_bytes(face)
    (ok / "d.pgm").symlink_to(src / "d.pgm")  # "copy" that is the source itself
    (other / "e.pgm").write_bytes(face)  # a copy outside the target folders
    recorded = {"a.pgm": f"{ok / 'a.pgm'} (moved)", "b.pgm": f"{ok / 'b.pgm'} (moved)",
                "c.pgm": f"{ok / 'c.pgm'} (moved (was already present))",
                "d.pgm": f"{ok / 'd.pgm'} (moved)", "e.pgm": f"{other / 'e.pgm'} (moved)"}
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")  # as the manifests are written
        writer.writerow(["path", "score", "raw_score", "decision", "threshold", "faces",
                         "reason", "error", "copied_to"])
        for name, copied_to in recorded.items():
            writer.writerow([src / name, 0.9, 0.9, "accept", 0.0, 1, "ok", "", copied_to])
        writer.writerow([other / "keep.pgm", 0.9, 0.9, "accept", 0.0, 1, "ok", "",
                         f"{other / 'keep.pgm'} (moved)"])
    done = _run("filter", str(src), "-o", str(tmp_path / "m.csv"), "--accepted-dir", str(ok),
                "--threshold", "0", "--move", "--resume", *SCORER)
    # the three moves it cannot finish fail this run too, as they failed the first
    assert done.returncode == 1, done.stderr
    assert b"; 3 moves recorded before not finished (see the warnings)" in done.stderr
    assert sorted(p.name for p in src.iterdir()) == ["b.pgm", "d.pgm", "e.pgm"]
    assert (ok / "a.pgm").read_bytes() == (ok / "c.pgm").read_bytes() == face
    assert (src / "d.pgm").read_bytes() == face and (other / "keep.pgm").read_bytes() == face
    assert done.stderr.count(b"which is missing, elsewhere or differs; kept") == 3
    assert len(_rows(tmp_path / "m.csv")) == 6


def test_move_from_read_only_media_or_onto_the_input_itself_loses_nothing(tmp_path,
                                                                          orl_root):
    from conftest import small_filesystem

    face = (orl_root / "s38" / "1.pgm").read_bytes()
    with small_filesystem(tmp_path / "media", "1m") as media:
        (media / "a.pgm").write_bytes(face)
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        args = ["filter", str(media), "-o", str(tmp_path / "m.csv"), "--accepted-dir",
                str(tmp_path / "ok"), "--threshold", "0", "--move", *SCORER]
        done = _run(*args)
        # a move that cannot finish copies nothing, says why, and is not redone
        assert done.returncode == 1 and (media / "a.pgm").read_bytes() == face
        row = _rows(tmp_path / "m.csv")[0]
        assert row["error"].startswith("not moved: ") and "read-only" in row["error"]
        assert not row["copied_to"] and not (tmp_path / "ok" / "a.pgm").exists()
        again = _run(*args, "--resume")  # not redone; still a failure of this job
        assert again.returncode == 1 and b"(1 of them failed)" in again.stderr
        assert len(_rows(tmp_path / "m.csv")) == 1
    # a target folder that is the input under another name (a bind mount) is refused
    src, alias = tmp_path / "in", tmp_path / "alias"
    src.mkdir()
    alias.mkdir()
    (src / "b.pgm").write_bytes(face)
    if subprocess.run(["mount", "--bind", str(src), str(alias)],
                      capture_output=True).returncode:
        pytest.skip("needs a bind mount (mount, as root)")
    try:
        done = _run("filter", str(src), "--accepted-dir", str(alias), "--threshold", "0",
                    "--move", *SCORER)
        assert done.returncode == 2 and b"is inside a target folder" in done.stderr
        assert (src / "b.pgm").read_bytes() == face
    finally:
        subprocess.run(["umount", "--lazy", str(alias)], check=False)
    # a sub-folder of the input mounted onto the target (and its file hard-linked
    # elsewhere): the destination is the source's own entry, never a reason to remove it
    top, target, keep = tmp_path / "top", tmp_path / "target", tmp_path / "keep"
    for d in (top / "d", target / "d", keep):
        d.mkdir(parents=True)
    (top / "d" / "c.pgm").write_bytes(face)
    os.link(top / "d" / "c.pgm", keep / "c.pgm")
    subprocess.run(["mount", "--bind", str(top / "d"), str(target / "d")], check=True)
    try:
        done = _run("filter", str(top), "-o", str(tmp_path / "m2.csv"), "--accepted-dir",
                    str(target), "--threshold", "0", "--move", *SCORER)
        assert done.returncode == 0, done.stderr
        assert (top / "d" / "c.pgm").read_bytes() == face
        assert _rows(tmp_path / "m2.csv")[0]["copied_to"].endswith(
            "(already there (it is the source itself))")
    finally:
        subprocess.run(["umount", "--lazy", str(target / "d")], check=False)
    # the target mounted inside the input: its files are not inputs
    inner = tmp_path / "inner"
    (inner / "sub").mkdir(parents=True)
    (inner / "e.pgm").write_bytes(face)
    out = tmp_path / "out"
    (out / "x").mkdir(parents=True)
    (out / "x" / "old.pgm").write_bytes(face)
    subprocess.run(["mount", "--bind", str(out), str(inner / "sub")], check=True)
    try:
        done = _run("filter", str(inner), "-o", str(tmp_path / "m3.csv"), "--accepted-dir",
                    str(out), "--threshold", "0", *SCORER)
        assert done.returncode == 0, done.stderr
        assert [Path(r["path"]).name for r in _rows(tmp_path / "m3.csv")] == ["e.pgm"]
    finally:
        subprocess.run(["umount", "--lazy", str(inner / "sub")], check=False)


def _two_inputs_that_cannot_be_copied(tmp_path: Path, orl_root: Path) -> tuple[Path, Path]:
    """Folders a/ and b/ with a face each, and ok/ already holding other files of their
    names: each copy fails (never overwritten), a row saying "copy failed"."""
    ok = tmp_path / "ok"
    ok.mkdir()
    for folder, name, face in (("a", "1.pgm", "s38/1.pgm"), ("b", "2.pgm", "s38/2.pgm")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes((orl_root / face).read_bytes())
        (ok / name).write_bytes(b"someone else's file")
    return tmp_path / "a", tmp_path / "b"


def test_a_resume_redoes_only_its_own_failed_copies_and_counts_old_failures(tmp_path,
                                                                            orl_root):
    a, b = _two_inputs_that_cannot_be_copied(tmp_path, orl_root)
    ok, manifest = tmp_path / "ok", tmp_path / "m.csv"
    args = ["-o", str(manifest), "--accepted-dir", str(ok), "--threshold", "0", *SCORER]
    assert _run("filter", str(a), str(b), *args).returncode == 1
    assert all("copy failed" in r["error"] for r in _rows(manifest))
    (ok / "1.pgm").unlink()  # room for a's copy now
    done = _run("filter", str(a), *args, "--resume")  # b is no input of this run
    assert done.returncode == 0, done.stderr
    rows = {Path(r["path"]).name: r for r in _rows(manifest)}
    assert rows["2.pgm"]["error"].startswith("copy failed")  # b's row kept, not dropped
    assert rows["1.pgm"]["copied_to"].endswith("(copied)") and not rows["1.pgm"]["error"]
    # An input that failed before (not a copy: it is no image) is not done again, and
    # still makes the exit code 1: `filter ... --resume && next-step` must not go on.
    (a / "3.jpg").write_bytes(b"not a picture")
    plain = ["-o", str(tmp_path / "m2.csv"), "--threshold", "0", *SCORER]
    assert _run("filter", str(a), *plain).returncode == 1
    done = _run("filter", str(a), *plain, "--resume")
    assert b"2 done before, in the manifest (1 of them failed)" in done.stderr
    assert done.returncode == 1, done.stderr
    assert len(_rows(tmp_path / "m2.csv")) == 2


def test_a_resume_from_another_working_folder_is_refused(tmp_path, orl_root):
    job = tmp_path / "job"
    (job / "in").mkdir(parents=True)
    for i in (1, 2):
        (job / "in" / f"{i}.pgm").write_bytes((orl_root / "s38" / f"{i}.pgm").read_bytes())
    args = ["--threshold", "0", "--accepted-dir", "ok", *SCORER]
    first = subprocess.run([sys.executable, "-m", "fiqa_gate", "filter", "in", "-o", "m.csv",
                            *args], cwd=job, capture_output=True, timeout=600)
    assert first.returncode == 0, first.stderr
    before = (job / "m.csv").read_bytes()
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "filter", "job/in", "-o",
                           "job/m.csv", *args, "--resume"], cwd=tmp_path, capture_output=True,
                          timeout=600)
    assert done.returncode == 2
    assert b"written from another working folder" in done.stderr
    assert str(job).encode() in done.stderr  # where to resume from
    assert (job / "m.csv").read_bytes() == before and not (tmp_path / "ok").exists()
    again = subprocess.run([sys.executable, "-m", "fiqa_gate", "score", "job/in", "-o",
                            "job/s.csv", *SCORER], cwd=tmp_path, capture_output=True,
                           timeout=600)
    assert again.returncode == 0  # a resume from the right folder is not refused:
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "score", "job/in", "-o",
                           "job/s.csv", "--resume", *SCORER], cwd=tmp_path,
                          capture_output=True, timeout=600)
    assert done.returncode == 0 and len(_rows(job / "s.csv")) == 2, done.stderr


def test_a_threshold_cell_that_is_no_number_is_a_clear_error(tmp_path, orl_root):
    src = tmp_path / "in"
    src.mkdir()
    (src / "1.pgm").write_bytes((orl_root / "s38" / "1.pgm").read_bytes())
    manifest = tmp_path / "m.csv"
    assert _run("filter", str(src), "-o", str(manifest), *SCORER).returncode == 0
    manifest.write_text(manifest.read_text().replace(",0.5,", ",50%,"))
    done = _run("filter", str(src), "-o", str(manifest), "--resume", *SCORER)
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"has the threshold '50%', not a number" in done.stderr


def test_two_runs_never_write_one_manifest(tmp_path):
    from fiqa_gate.errors import ManifestError
    from fiqa_gate.manifest import open_manifest

    path = str(tmp_path / "m.csv")
    with open_manifest(path, ["path", "error"]) as first:
        first.write_rows([{"path": "a.jpg", "error": ""}])
        for resume in (False, True):
            with pytest.raises(ManifestError, match="being written by another fiqa-gate run"):
                open_manifest(path, ["path", "error"], resume=resume)
        first.write_rows([{"path": "b.jpg", "error": ""}])
    assert [r["path"] for r in _rows(Path(path))] == ["a.jpg", "b.jpg"]  # nothing cut
    # once the first has finished, a resume goes on, also after rewriting the file
    with open_manifest(path, ["path", "error"], resume=True,
                       redo=lambda row: row["path"] == "a.jpg") as second:
        assert second.done == {"b.jpg"}
        with pytest.raises(ManifestError, match="being written"):  # the rewritten file
            open_manifest(path, ["path", "error"], resume=True)
        second.write_rows([{"path": "a.jpg", "error": ""}])
    assert [r["path"] for r in _rows(Path(path))] == ["b.jpg", "a.jpg"]


def test_reports_and_caches_follow_the_umask_and_keep_a_replaced_file_s_mode_and_owner(
        tmp_path):
    import os

    from fiqa_gate.assets import atomic_write_bytes

    mask = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "new.json", b"{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o600
    kept = tmp_path / "kept.json"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(kept, 65534, 65534)  # another user's report, rewritten by root
    atomic_write_bytes(kept, b"new")
    st = kept.stat()
    assert kept.read_bytes() == b"new" and st.st_mode & 0o777 == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    # the temporary name does not grow with the file's: a 250-byte name can be replaced
    long = tmp_path / ("m" * 246 + ".csv")
    long.write_bytes(b"a")
    atomic_write_bytes(long, b"b")
    assert long.read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["new.json", "kept.json",
                                                                 long.name])
    # A file the user names (bench -o FILE) is written through a link, as `>` does: the
    # file it points to is the new one. A cache file, or a report inside an -o folder,
    # never is: whoever can write there could point a link at a file of the user's.
    from fiqa_gate.evaluation.report import replace_file

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "report.md").write_bytes(b"old")
    os.symlink("docs/report.md", tmp_path / "report.md")
    replace_file(tmp_path / "report.md", lambda fh: fh.write(b"new"), named=True)
    assert (tmp_path / "report.md").is_symlink()
    assert (tmp_path / "docs" / "report.md").read_bytes() == b"new"
    replace_file(tmp_path / "report.md", lambda fh: fh.write(b"newer"))  # in a folder
    assert not (tmp_path / "report.md").is_symlink()
    assert (tmp_path / "docs" / "report.md").read_bytes() == b"new"
    os.mkfifo(tmp_path / "report.json")  # left in a report folder: replaced, not opened
    replace_file(tmp_path / "report.json", lambda fh: fh.write(b"{}"))
    assert (tmp_path / "report.json").read_bytes() == b"{}"
    (tmp_path / "report.json").unlink()
    (tmp_path / "precious").write_bytes(b"the user's")
    os.symlink(tmp_path / "precious", tmp_path / "cache.sha256")
    atomic_write_bytes(tmp_path / "cache.sha256", b"digest")
    assert not (tmp_path / "cache.sha256").is_symlink()
    assert (tmp_path / "precious").read_bytes() == b"the user's"
    # -o /dev/stdout into a pipe is written to as it is (it resolves to no file); into a
    # file, by any spelling, it is appended to, not renamed over (the shell's lines stay)
    code = ("import pathlib, sys; from fiqa_gate.evaluation.report import replace_file; "
            "replace_file(pathlib.Path(sys.argv[1]), lambda fh: fh.write(b'{}'), named=True)")
    done = subprocess.run([sys.executable, "-c", code, "/dev/stdout"], capture_output=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == b"{}", done.stderr
    os.symlink("/dev/stdout", tmp_path / "to-stdout")
    log = tmp_path / "log.txt"
    log.write_bytes(b"before\n")
    with open(log, "ab") as out:
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "to-stdout")],
                              stdout=out, timeout=120)
    assert done.returncode == 0 and log.read_bytes() == b"before\n{}"
    # a dangling link to a report: the file it names is made, as `>` makes it
    os.symlink("docs/today.json", tmp_path / "today.json")
    replace_file(tmp_path / "today.json", lambda fh: fh.write(b"{}"), named=True)
    assert (tmp_path / "today.json").is_symlink()
    assert (tmp_path / "docs" / "today.json").read_bytes() == b"{}"


def test_a_temporary_file_of_a_killed_writer_is_removed_by_the_next_write_there(tmp_path):
    from fiqa_gate.assets import _alive, _host_tag, atomic_write_bytes

    dead = next(p for p in range(4_000_000, 4_100_000) if not _alive(p))
    left = tmp_path / f".fiqa-{_host_tag()}-{dead}-abcdefgh.tmp"  # a report cut by SIGKILL
    left.write_bytes(b"half a report")
    atomic_write_bytes(tmp_path / "report.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_ctrl_c_inside_a_library_s_own_error_still_exits_130():
    from fiqa_gate.errors import caused_by_interrupt

    def load() -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # as ONNX Runtime reports it while it loads
            raise ImportError("initialization failed") from exc

    with pytest.raises(ImportError) as err:
        load()
    assert caused_by_interrupt(err.value)
    assert not caused_by_interrupt(ImportError("no module named x"))


def test_a_photo_named_like_a_temporary_file_is_not_copied_where_it_would_be_removed(
        tmp_path, orl_root):
    photo = tmp_path / "in" / ".fiqa-99999-holidays.part"
    photo.parent.mkdir()
    photo.write_bytes((orl_root / "s38" / "1.pgm").read_bytes())
    done = _run("filter", str(photo), "-o", str(tmp_path / "m.csv"), "--accepted-dir",
                str(tmp_path / "ok"), "--threshold", "0", "--move", *SCORER)
    assert done.returncode == 1
    (row,) = _rows(tmp_path / "m.csv")
    assert "named as fiqa-gate's temporary files are; rename it" in row["error"]
    assert photo.is_file() and not (tmp_path / "ok" / photo.name).exists()


def test_which_resumes_count_as_from_another_working_folder(tmp_path, orl_root):
    def fiqa(cwd: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fiqa_gate", *args, *SCORER], cwd=cwd,
                              capture_output=True, timeout=600)

    face = (orl_root / "s38" / "1.pgm").read_bytes()
    # A new input folder in the same place, holding a file of the same name as one done
    # before: a resume like any other, not a manifest from elsewhere.
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.pgm").write_bytes(face)
    (tmp_path / "sub" / "a.pgm").write_bytes((orl_root / "s38" / "2.pgm").read_bytes())
    assert fiqa(tmp_path, "score", "a.pgm", "-o", "m.csv").returncode == 0
    done = fiqa(tmp_path, "score", "sub", "-o", "m.csv", "--resume")
    assert done.returncode == 0, done.stderr
    assert [r["path"] for r in _rows(tmp_path / "m.csv")] == ["a.pgm", "sub/a.pgm"]
    # Rows written from a folder beside the input ("../photos/..."), resumed from above
    # it: refused, not done twice.
    (tmp_path / "photos").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "photos" / "1.pgm").write_bytes(face)
    assert fiqa(tmp_path / "work", "score", "../photos", "-o", "../n.csv").returncode == 0
    done = fiqa(tmp_path, "score", "photos", "-o", "n.csv", "--resume")
    assert done.returncode == 2 and b"written from another working folder" in done.stderr
    assert len(_rows(tmp_path / "n.csv")) == 1
    # Every file done before was moved away; new ones of the same names arrive in a
    # sub-folder: the moved rows are no sign of another working folder.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in (1, 2):
        (inbox / f"{i}.pgm").write_bytes((orl_root / "s38" / f"{i}.pgm").read_bytes())
    move = ["filter", ".", "-o", "../o.csv", "--accepted-dir", "../ok", "--threshold", "0",
            "--move"]
    assert fiqa(inbox, *move).returncode == 0 and not list(inbox.iterdir())
    (inbox / "cam2").mkdir()
    for i in (1, 2):
        (inbox / "cam2" / f"{i}.pgm").write_bytes((orl_root / "s39" / f"{i}.pgm").read_bytes())
    done = fiqa(inbox, *move, "--resume")
    assert done.returncode == 0, done.stderr
    assert len(_rows(tmp_path / "o.csv")) == 4 and not list((inbox / "cam2").iterdir())


def test_a_resume_through_dev_stdout_or_onto_a_pipe(tmp_path, orl_root):
    import os

    a, b = _two_inputs_that_cannot_be_copied(tmp_path, orl_root)
    manifest, ok = tmp_path / "m.csv", tmp_path / "ok"
    args = ["filter", str(a), str(b), "--accepted-dir", str(ok), "--threshold", "0", *SCORER]
    assert _run(*args, "-o", str(manifest)).returncode == 1
    (ok / "1.pgm").unlink()
    (ok / "2.pgm").unlink()
    # `-o /dev/stdout >> m.csv`: the rewrite (failed copies dropped) renames a new file
    # over m.csv, and the rows this run writes must land in it, not in the old one
    with open(manifest, "ab") as out:
        done = subprocess.run([sys.executable, "-m", "fiqa_gate", *args, "-o", "/dev/stdout",
                               "--resume"], stdout=out, stderr=subprocess.PIPE, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = _rows(manifest)
    assert sorted(Path(r["path"]).name for r in rows) == ["1.pgm", "2.pgm"]
    assert all(r["copied_to"].endswith("(copied)") for r in rows)
    # a named pipe is no manifest to resume: refused at once (opening it would wait)
    os.mkfifo(tmp_path / "pipe")
    done = _run(*args, "-o", str(tmp_path / "pipe"), "--resume", timeout=60)
    assert done.returncode == 2 and b"is not one" in done.stderr


def test_an_unusable_cache_falls_back_to_a_private_one(tmp_path, orl_root):
    people = tmp_path / "people"
    for s in ("s1", "s2"):
        (people / s).mkdir(parents=True)
        (people / s / "1.pgm").write_bytes((orl_root / s / "1.pgm").read_bytes())
    (tmp_path / "a-file").write_text("")
    env = {**os.environ, "FIQA_GATE_CACHE": str(tmp_path / "a-file")}
    # enroll needs SFace, whose repaired file the cache holds: made again in a private one
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", "enroll", str(people),
                           "--index", str(tmp_path / "g"), "--no-gate"], env=env,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert b"the cache cannot be used" in done.stderr and b"a-file" in done.stderr
    assert b"enrolled 2 faces" in done.stderr


def test_a_damaged_test_set_cache_is_made_again(tmp_path, orl_root, caplog):
    from fiqa_gate.datasets import Samples
    from fiqa_gate.evaluation.protocol import load_test_set
    from fiqa_gate.registry import get_detector

    people = tmp_path / "people"
    for s in ("s1", "s2"):
        (people / s).mkdir(parents=True)
        (people / s / "1.pgm").write_bytes((orl_root / s / "1.pgm").read_bytes())
    cache = tmp_path / "cache" / "set.npz"
    first = load_test_set(get_detector(), root=people, variants=1, cache=cache)
    whole = cache.read_bytes()
    for damaged in (whole[: len(whole) // 2], b""):
        cache.write_bytes(damaged)
        again = load_test_set(get_detector(), root=people, variants=1, cache=cache)
        assert again.records == first.records and "cannot be read" in caplog.text
        assert Samples.load(cache).records == first.records  # and cached whole again


@pytest.mark.parametrize("closed", [">&-", "2>&-", "2>/dev/full"])
def test_a_closed_stdout_or_stderr(tmp_path, orl_root, closed):
    face = tmp_path / "a.pgm"
    face.write_bytes((orl_root / "s1" / "1.pgm").read_bytes())
    command = f"'{sys.executable}' -m fiqa_gate score --scorer sharpness '{face}'"
    done = subprocess.run(["bash", "-c", f"{command} {closed}"], capture_output=True,
                          timeout=600)
    if closed == ">&-":  # the rows have nowhere to go: said, not lost silently
        assert done.returncode == 2 and b"stdout is closed" in done.stderr
    else:  # the messages have nowhere to go: the work is done
        assert done.returncode == 0 and done.stdout.count(b"\n") == 2


def test_a_working_folder_deleted_under_the_command(tmp_path, orl_root):
    face = tmp_path / "a.pgm"
    face.write_bytes((orl_root / "s1" / "1.pgm").read_bytes())
    command = (f"mkdir '{tmp_path / 'gone'}' && cd '{tmp_path / 'gone'}' && rmdir ../gone && "
               f"'{sys.executable}' -m fiqa_gate score --scorer sharpness")
    done = subprocess.run(["bash", "-c", f"{command} ."], capture_output=True, timeout=600)
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"the working folder no longer exists" in done.stderr
    done = subprocess.run(["bash", "-c", f"{command} '{face}'"], capture_output=True,
                          timeout=600)  # absolute paths need no working folder
    assert done.returncode == 0, done.stderr


def test_a_report_folder_reached_through_a_link_and_dot_dot(tmp_path):
    # proj/link -> ../data/real; "proj/link/../rep" is data/rep to the kernel, though the
    # text reads proj/rep: the report goes where the kernel finds the folder
    from fiqa_gate.evaluation.report import replace_file

    (tmp_path / "data" / "real").mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    os.symlink("../data/real", tmp_path / "proj" / "link")
    (tmp_path / "data" / "rep").mkdir()
    replace_file(tmp_path / "proj" / "link" / ".." / "rep" / "report.md",
                 lambda fh: fh.write(b"# report"))
    assert (tmp_path / "data" / "rep" / "report.md").read_bytes() == b"# report"
    assert not (tmp_path / "proj" / "rep").exists()
