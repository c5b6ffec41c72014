"""What a training config may hold, checked before any stage runs.

`SCHEMA` lists every key the recipe reads: required where the code reads it with `[]`,
optional where it reads it with `.get` (or a default). `check_config` refuses a config
with an unknown key (a typo would be ignored), a missing required key (the stage that
needs it would fail only after the hours before it), a value of the wrong JSON type, or
a string outside the fixed set the code handles, naming the file and the dotted key.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import GenericAlias
from typing import Any

Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]  # a callable: imported when used


@dataclass(frozen=True)
class Key:
    """One key: its type (int, float, str, bool, dict = any object, list[...] = a list of
    those, or a nested schema), whether it must be there, and the strings it may hold (a
    choice ending in ':' is a prefix: 'identity:' accepts 'identity:/path')."""

    type: Any
    required: bool = False
    choices: Choices = ()


def required(type_: Any, choices: Choices = ()) -> Key:
    return Key(type_, True, choices)


def optional(type_: Any, choices: Choices = ()) -> Key:
    return Key(type_, False, choices)


def _stages() -> tuple[str, ...]:
    from fiqa_gate_training.recipe import STAGES  # recipe imports this module

    return STAGES


def _kinds() -> tuple[str, ...]:
    from fiqa_gate.degradations import ALL_KINDS

    return ALL_KINDS


# models.py::ACTIVATIONS (that module imports torch; a test keeps the two equal)
ACTIVATIONS = ("gelu", "relu")

# the network and its training, teacher and student alike: models.build_model, train.fit,
# recipe._train, data.trunk_view_bytes, teacher.py
SPEC: dict[str, Key] = {
    "backbone": required(str), "input_size": required(int), "epochs": required(int),
    "batch_size": required(int), "lr": required(float), "weight_decay": required(float),
    "schedule": optional(str, ("cosine", "step")),
    "decay_epochs": optional(int), "decay_ratio": optional(float),  # with schedule "step"
    "seed": optional(int), "freeze": optional(int), "drop_path": optional(float),
    "ema": optional(float), "select_on_val": optional(bool),
    "activation": optional(str, ACTIVATIONS), "timm_img_size": optional(bool),
    "backbone_args": optional(dict), "max_steps": optional(int),
}

SCHEMA: dict[str, Key] = {
    # cli.py, report.py (name: the run folder and the model card)
    "name": optional(str), "description": optional(str),
    # data.build, data.memory_plan, data.distillation_kinds; recipe, teacher.py, report.py
    "data": required({
        "labelled": required(str, ("orl", "identity:")),
        "train_identities": optional(list[str]), "val_identities": optional(list[str]),
        "recognizer": required(str), "detector": optional(str),
        "variants": required(int), "unlabelled": required(list[str]),
        "unlabelled_variants": required(int), "b_labelled_variants": optional(int),
        "b_extra_kinds": optional(list[str], _kinds),
        "temperature": required(float), "seed": required(int),
        "mos_csv": optional(str), "mos_root": optional(str), "memory_check": optional(bool),
    }),
    # recipe.stage_teacher / stage_enhanced, teacher.py (fuse_norm)
    "teacher": required({**SPEC, "fuse_norm": optional(bool)}),
    # recipe.stage_student / _distillation_set / _student_graph, train.TrunkHint (hint)
    "student": required({
        **SPEC, "quantize": optional(str, ("int8",)),
        "targets": optional(str, ("labels", "enhanced")),
        "hint": optional({"weight": required(float), "components": required(int),
                          "stage": optional(int), "set_b": optional(bool)}),
    }),
    # recipe._students (the ablation stage), report.model_card
    "ablation": optional(bool),
    # recipe._size_runs / stage_input_size, report.model_card (which reads max_faces)
    "input_size_ablation": optional({
        "sizes": required(list[int]), "epochs": required(int),
        "max_faces": required(int), "seeds": optional(list[int]),
    }),
    # recipe.run_recipe
    "skip_stages": optional(list[str], _stages),
}

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          dict: "an object"}


def _expected(type_: Any) -> str:
    if isinstance(type_, GenericAlias):
        return f"a list of {_NAMES[type_.__args__[0]].split(' ', 1)[1]}s"
    return "an object" if isinstance(type_, dict) else _NAMES[type_]


def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"{'an integer' if isinstance(value, int) else 'a number'} ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return "a list" if isinstance(value, list) else "an object"


def _is(value: Any, type_: Any) -> bool:
    if isinstance(value, bool):  # JSON true is no integer here
        return type_ is bool
    if type_ is float:
        return isinstance(value, (int, float))
    return isinstance(value, type_)


def _allowed(value: str, choices: tuple[str, ...]) -> bool:
    return any(value.startswith(c) and len(value) > len(c) if c.endswith(":") else value == c
               for c in choices)


def _dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _check(value: Any, key: Key, where: str, problems: list[str]) -> None:
    """Append to `problems` what is wrong with `value`, found at the dotted key `where`."""
    if isinstance(key.type, dict):  # a nested schema
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {_got(value)}")
            return
        for name, sub in value.items():
            if name not in key.type:
                close = difflib.get_close_matches(name, list(key.type), n=1)
                hint = f" (did you mean {_dotted(where, close[0])}?)" if close else ""
                problems.append(f"{_dotted(where, name)}: unknown key{hint}")
            else:
                _check(sub, key.type[name], _dotted(where, name), problems)
        problems += [f"{_dotted(where, name)}: missing (required: {_expected(sub.type)})"
                     for name, sub in key.type.items() if sub.required and name not in value]
        return
    item = key.type.__args__[0] if isinstance(key.type, GenericAlias) else None
    if not _is(value, list if item else key.type):
        problems.append(f"{where}: expected {_expected(key.type)}, got {_got(value)}")
        return
    choices = key.choices() if callable(key.choices) else key.choices
    for at, v in ([(f"{where}[{i}]", v) for i, v in enumerate(value)] if item
                  else [(where, value)]):
        if item and not _is(v, item):
            problems.append(f"{at}: expected {_expected(item)}, got {_got(v)}")
        elif choices and not _allowed(v, choices):
            shown = [c + "/path" if c.endswith(":") else c for c in choices]
            close = difflib.get_close_matches(v, shown, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{at}: {v!r} is not one of {', '.join(shown)}{hint}")


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    value = cfg.get(name)
    return value if isinstance(value, dict) else {}


def _across(cfg: dict[str, Any]) -> list[str]:
    """What one key needs of another, where the code would fail late without it."""
    problems = []
    for name in ("teacher", "student"):
        spec = _section(cfg, name)
        if spec.get("schedule") == "step":  # train.fit's StepLR
            problems += [f"{name}.{k}: missing (required with schedule 'step')"
                         for k in ("decay_epochs", "decay_ratio") if k not in spec]
    problems += _ranges(cfg)
    student, teacher = _section(cfg, "student"), _section(cfg, "teacher")
    if student.get("targets") == "enhanced" and _section(cfg, "data").get("mos_csv"):
        problems.append("student.targets: 'enhanced' cannot be used with data.mos_csv "
                        "(recipe._distillation_set); use 'labels'")
    if student.get("hint") and not teacher.get("freeze"):
        problems.append("student.hint: needs teacher.freeze > 0 (the hint is taken from "
                        "the teacher's frozen trunk)")
    return problems


# The least each number may be: an epoch count of -3 or 0 had exported an untrained
# student with exit 0, a batch of 0 divided by zero after the data stage.
# (section, key): the least a number may be, whether that bound is allowed, and the
# bound it must stay below (None: none)
_RANGES: dict[tuple[str, str], tuple[float, bool, float | None]] = {
    **{(net, key): bound for net in ("teacher", "student") for key, bound in {
        "epochs": (1, True, None), "batch_size": (1, True, None),
        "input_size": (16, True, None), "weight_decay": (0, True, None),
        "freeze": (0, True, None), "max_steps": (1, True, None),
        "decay_epochs": (1, True, None), "lr": (0, False, None),
        "decay_ratio": (0, False, None), "ema": (0, True, 1), "drop_path": (0, True, 1),
    }.items()},
    ("data", "variants"): (0, True, None), ("data", "unlabelled_variants"): (0, True, None),
    ("data", "b_labelled_variants"): (0, True, None), ("data", "temperature"): (0, False, None),
    ("student.hint", "components"): (1, True, None), ("student.hint", "weight"): (0, True, None),
    ("input_size_ablation", "epochs"): (1, True, None),
    ("input_size_ablation", "max_faces"): (1, True, None),
}


def _ranges(cfg: dict[str, Any]) -> list[str]:
    """Numbers of the right type but outside what the recipe can run with (-3 epochs had
    exported an untrained student with exit 0, a batch of 0 divided by zero after the data
    stage), and backbone names timm does not know: found here, not when their stage
    starts hours later."""
    problems = []
    for (where, key), (low, low_ok, high) in _RANGES.items():
        section: Any = cfg
        for part in where.split("."):
            section = section.get(part) if isinstance(section, dict) else None
        v = section.get(key) if isinstance(section, dict) else None
        if not _is(v, float):
            continue
        if not math.isfinite(v) or v < low or (v == low and not low_ok) or (
                high is not None and v >= high):
            span = f"{'at least' if low_ok else 'above'} {low:g}" + (
                f" and below {high:g}" if high is not None else "")
            problems.append(f"{where}.{key}: {v!r} is out of range (it must be {span})")
    sizes = _section(cfg, "input_size_ablation").get("sizes")
    if isinstance(sizes, list) and any(_is(x, int) and x < 16 for x in sizes):
        problems.append(f"input_size_ablation.sizes: {sizes!r} is out of range (each must "
                        "be at least 16)")
    if importlib.util.find_spec("timm") is not None:  # the [train] extra
        import timm

        for name in ("teacher", "student"):
            backbone = _section(cfg, name).get("backbone")
            if not isinstance(backbone, str):
                continue
            prefix, rest = _timm_prefix(backbone), backbone.partition(":")[2]
            if prefix == "local-dir" and not os.path.isdir(rest):
                problems.append(f"{name}.backbone: {backbone!r} names no folder (timm reads "
                                "local-dir:PATH's config.json and weights from it)")
            elif prefix in ("hf-hub", "hf_hub") and not rest.strip():
                problems.append(f"{name}.backbone: {backbone!r} names no model")
            if backbone != "sface" and prefix not in _FETCHED and not timm.is_model(backbone):
                close = difflib.get_close_matches(backbone, timm.list_models(), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                problems.append(f"{name}.backbone: {backbone!r} is neither 'sface' nor a "
                                f"timm model{hint}")
    return problems


# timm's prefixes for a net whose definition and weights it fetches (a hub, a folder)
_FETCHED = ("hf-hub", "hf_hub", "local-dir")


def _timm_prefix(backbone: str) -> str:
    return backbone.split(":", 1)[0].lower()


def _hint_stage(student: dict[str, Any]) -> list[str]:
    """The student's hint stage must be one the net has and that gives a map, probed as
    training probes it (a stage past the last had failed with an IndexError when the
    student stage started, an hour in)."""
    hint, backbone = student.get("hint"), student.get("backbone")
    if not isinstance(hint, dict) or not isinstance(backbone, str) or not _is(
            hint.get("stage", 2), int):
        return []
    if _timm_prefix(backbone) in _FETCHED or importlib.util.find_spec("timm") is None:
        return []  # built from files only the student stage reads, or with no [train]
    from fiqa_gate_training.models import build_model
    from fiqa_gate_training.train import hint_map

    stage = hint.get("stage", 2)
    try:
        hint_map(build_model(student), stage)
    except IndexError as exc:
        return [f"student.hint.stage: {stage} is out of range ({backbone} has {exc})"]
    except Exception as exc:  # backbone_args timm refuses, a net without stages or maps
        return [f"student: its backbone cannot take a hint: {type(exc).__name__}: {exc}"]
    return []


def check_config(cfg: object, source: str) -> None:
    """Raise ValueError listing every problem of `cfg` (read from `source`), one a line:
    "SOURCE: dotted.key: what is wrong"."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: the top level must be a JSON object, not {_got(cfg)}")
    problems: list[str] = []
    _check(cfg, required(SCHEMA), "", problems)
    problems += _across(cfg)
    if not problems:  # builds the student's net: only from a spec that is otherwise right
        problems += _hint_stage(_section(cfg, "student"))
    if problems:
        raise ValueError("\n".join(f"{source}: {p}" for p in problems))
