"""Stage 0: the training data, and the recognition-derived labels.

Label definition (what the shipped score means). For a face x of identity i, let R(x)
be the clean faces of identity i cut from *other* source images (the "good references";
at most 64, a seeded sample where an identity has more photos).
With the recognizer's embedding e() and its FMR 1e-3 threshold tau (SFace: 0.383):

    matched(x)  = mean over r in R(x) of [cos(e(x), e(r)) >= tau]        (hard)
    label(x)    = mean over r in R(x) of sigmoid((cos(e(x), e(r)) - tau) / T)   (soft)

`matched` estimates the contract's probability "matched to a good reference at the
operating threshold"; `label` is the same expectation with the step softened by T
(0.03 cosine by default), which ranks faces inside the sure-match and sure-miss groups by
their margin. Networks regress `label`; calibration maps their raw output to
P(match) with the per-reference outcomes, so the shipped score means `matched`.
"""

from __future__ import annotations

import difflib
import logging
import os
import unicodedata
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fiqa_gate import degradations
from fiqa_gate.assets import atomic_save_array, atomic_write_json
from fiqa_gate.datasets import (
    ORL_TRAIN,
    ORL_VAL,
    Samples,
    SourceFace,
    build_samples,
    detect_sources,
    identity_folder,
    orl_items,
    read_mos_csv,
    source_key,
    unlabelled_folder,
)
from fiqa_gate.errors import FiqaGateError
from fiqa_gate.evaluation.metrics import edc, pair_quality
from fiqa_gate.evaluation.protocol import reference_pairs, similarities, verification_pairs
from fiqa_gate.faces import ALIGNED_SIZE
from fiqa_gate.registry import get_detector, get_recognizer

log = logging.getLogger("fiqa_gate.training")


def with_references(faces: list[SourceFace], set_name: str,
                    skipped: list[tuple[str, str]]) -> list[SourceFace]:
    """The faces of people with two pictures or more in which a face was found. A face's
    label is its match with the person's other pictures, so one picture alone (most LFW
    identities) cannot be labelled: its people are left out, with a word (they had
    crashed the data stage after all the detection and embedding). Each is added to
    `skipped` (labels.json lists them)."""
    per_person = Counter(f.identity for f in faces)
    alone = sorted(str(i) for i, n in per_person.items() if n < 2)
    skipped += [(f.source, f"the only picture of {f.identity} with a face: no other to "
                 "label it against") for f in faces if per_person[f.identity] < 2]
    if alone:
        log.warning("data: %d identities of the %s set left out, each with one picture "
                    "with a face (a label needs another of the same person): %s",
                    len(alone), set_name, ", ".join(alone[:5]) + (", ..." if len(alone) > 5
                                                                  else ""))
    return [f for f in faces if per_person[f.identity] > 1]


def utility_labels(samples: Samples, embeddings: np.ndarray, threshold: float,
                   temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(soft label, hard matched fraction, per-reference match flags) per face."""
    f, r = reference_pairs(samples)
    cos = similarities(embeddings, f, r)
    hits = cos >= threshold
    soft = 1 / (1 + np.exp(-(cos - threshold) / temperature))
    n = np.bincount(f, minlength=len(samples)).astype(np.float64)
    if (n == 0).any():
        raise ValueError("some faces have no clean reference of the same identity")
    label = np.bincount(f, weights=soft, minlength=len(samples)) / n
    matched = np.bincount(f, weights=hits.astype(np.float64), minlength=len(samples)) / n
    return label, matched, hits


def embeddings_file(data: Path, set_name: str) -> Path:
    """Where a set's recognizer embeddings are kept (the validation set's, by the data
    stage's labelling pass)."""
    return data / f"{set_name}_embeddings.npy"


def _split(sources: list, fraction_b: float = 0.5) -> tuple[list, list]:
    """Split unlabelled faces into sets A and B by a hash of their source (machine-free)."""
    a, b = [], []
    for s in sources:
        in_b = (zlib.crc32(source_key(s.source).encode()) % 1000) / 1000 < fraction_b
        (b if in_b else a).append(s)
    return a, b


def _warn_held_out(csv_path: str, mos: list[Path], val: list[Path]) -> None:
    """Warn when a MOS image is (byte for byte) a validation picture, which selects and
    calibrates the student, or one of the test split's, which measures it."""
    import contextlib

    from fiqa_gate.assets import sha256_file
    from fiqa_gate.datasets import ORL_TEST

    def digests(paths: list[Path]) -> dict[str, Path]:
        out = {}
        for path in paths:
            with contextlib.suppress(OSError):
                out[sha256_file(path)] = path
        return out

    listed = digests(mos)
    for what, paths in (("validation", val), ("test split (ORL s31-s40)",
                                              [p for _, p in orl_items(ORL_TEST)])):
        both = sorted(str(listed[h]) for h in set(listed) & set(digests(paths)))
        if both:
            log.warning("%s: %d images are also %s pictures, so the figures measured on "
                        "them are no longer on unseen faces: %s", csv_path, len(both), what,
                        ", ".join(both[:3]) + (", ..." if len(both) > 3 else ""))


def user_inputs(d: dict[str, Any]) -> dict[str, Any]:
    """The files of a user's own data the config names (identity folder, MOS list and
    its images, unlabelled folders; not the packages' data), as a count and a digest of
    their paths, sizes and times: a run folder's data stage is not redone when they
    change, so a later run says they did."""
    import contextlib
    import hashlib

    from fiqa_gate_training.sources import SOURCES

    files: list[str] = []
    quiet = logging.getLogger("fiqa_gate")
    level, quiet.level = quiet.level, logging.ERROR  # the data stage said it all once
    try:
        if d["labelled"].startswith("identity:"):
            with contextlib.suppress(FiqaGateError):
                files += [str(p) for _, p in identity_folder(
                    os.path.expanduser(d["labelled"].split(":", 1)[1]))]
        if d.get("mos_csv"):
            files.append(os.path.expanduser(d["mos_csv"]))
            with contextlib.suppress(FiqaGateError):
                files += [str(p) for p, _ in read_mos_csv(
                    os.path.expanduser(d["mos_csv"]),
                    d.get("mos_root") and os.path.expanduser(d["mos_root"]))]
        for name in d.get("unlabelled") or []:
            if name not in SOURCES and name.strip():
                files += [str(p) for p in unlabelled_folder(Path(name).expanduser())]
    finally:
        quiet.level = level
    digest = hashlib.sha256()
    for f in sorted(set(files)):
        try:
            st = os.stat(f)
            digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
                "utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{f}\0gone\n".encode("utf-8", "surrogateescape"))
    return {"files": len(set(files)), "sha256": digest.hexdigest()}


def _split_identities(d: dict[str, Any], names: list[str], folder: str
                      ) -> tuple[set[str], set[str]]:
    """The identity folder's (training, validation) identities, as its folders spell them:
    as the config names them, else the ones the config does not name for training, else
    a fifth for validation by a hash of the name."""
    # a config names "José" composed; macOS and some zip tools write folder names
    # decomposed: the same name to a reader, other bytes to a set (two folders spelt so
    # are one identity already: `images.identity_folders`)
    spelt = {unicodedata.normalize("NFC", n): n for n in names}
    named = {k: [n if n in spelt.values() else spelt.get(unicodedata.normalize("NFC", n), n)
                 for n in d.get(k) or []] for k in ("train_identities", "val_identities")}
    unknown = sorted({n for v in named.values() for n in v} - set(names))
    if unknown:
        near = {n: difflib.get_close_matches(n, names, 1) for n in unknown[:5]}
        raise FiqaGateError(f"data: identities not in {folder}: " + ", ".join(
            n + (f" (did you mean {near[n][0]!r}?)" if near[n] else "") for n in near))
    if set(named["train_identities"]) & set(named["val_identities"]):
        raise FiqaGateError("data: an identity cannot be both in train_identities and in "
                            "val_identities")
    if named["val_identities"]:
        val = set(named["val_identities"])
    elif named["train_identities"]:
        val = set(names) - set(named["train_identities"])
    else:
        val = {n for n in names if zlib.crc32(n.encode("utf-8", "surrogateescape")) % 5 == 0}
    return set(named["train_identities"] or set(names) - val), val


def build(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write labelled_train/labelled_val/unlabelled_a/unlabelled_b .npz and labels.json."""
    from fiqa_gate_training.sources import unlabelled_images
    from fiqa_gate_training.teacher import norms_file

    d = cfg["data"]
    detector = get_detector(d.get("detector", "yunet"))
    recognizer = get_recognizer(d["recognizer"])
    seed = int(d["seed"])
    # Set B is labelled by the enhanced teacher, not by the recognizer, so it may carry
    # damage the labelled sets do not: the student then learns it from the teacher.
    b_kinds = distillation_kinds(d)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"recognizer": d["recognizer"], "threshold": recognizer.threshold}
    # before anything is read: a file changed while the stage runs is new to a later run
    report["user_inputs"] = user_inputs(d)

    labelled = d["labelled"]
    if labelled == "orl":
        train_items = orl_items(d.get("train_identities", ORL_TRAIN))
        val_items = orl_items(d.get("val_identities", ORL_VAL))
    elif labelled.startswith("identity:"):
        folder = os.path.expanduser(labelled.split(":", 1)[1])
        items = identity_folder(folder)
        names = sorted({i for i, _ in items})
        train_names, val_names = _split_identities(d, names, folder)
        if len(val_names) < 2 or len(train_names) < 2:  # no impostor pairs
            raise FiqaGateError(
                f"data.labelled: {folder} has {len(names)} identities, of which "
                f"{len(train_names)} are for training and {len(val_names)} for validation "
                "(by default a fifth, by a hash of the name); each needs two at least: add "
                "identities, or name them in data.train_identities / data.val_identities")
        train_items = [x for x in items if x[0] in train_names]
        val_items = [x for x in items if x[0] in val_names]
    else:
        raise ValueError(f"data.labelled: 'orl' or 'identity:/path', not {labelled!r}")

    mos_rows = (read_mos_csv(os.path.expanduser(d["mos_csv"]),
                             d.get("mos_root") and os.path.expanduser(d["mos_root"]))
                if d.get("mos_csv") else [])
    # Every face is found first, so the memory the run will need is known (and refused
    # with a clear message) before hours go into degrading and labelling them.
    found: dict[str, list] = {}
    skipped_of: dict[str, list[tuple[str, str]]] = {}
    for name, items in (("labelled_train", train_items), ("labelled_val", val_items)):
        skipped_of[name] = []
        found[name] = detect_sources(items, detector, skipped=skipped_of[name])
        if skipped_of[name]:
            log.warning("data: %d files of the %s set left out (%s); all in labels.json",
                        len(skipped_of[name]), name, "; ".join(
                            f"{p}: {r}" for p, r in skipped_of[name][:3])
                        + ("; ..." if len(skipped_of[name]) > 3 else ""))
        found[name] = with_references(found[name], name, skipped_of[name])
        if len({f.identity for f in found[name]}) < 2:  # no impostor pairs to label with
            why = "; ".join(f"{p}: {r}" for p, r in skipped_of[name][-3:])
            raise FiqaGateError(f"data: the {name} set has faces of "
                                f"{len({f.identity for f in found[name]})} identities; it "
                                "needs two at least" + (f" ({why})" if why else ""))
    if mos_rows:  # a user's human-labelled faces join the labelled training set
        missed: list[tuple[str, str]] = []
        found["mos"] = detect_sources([(None, p) for p, _ in mos_rows], detector,
                                      skipped=missed)
        if not found["mos"]:
            raise FiqaGateError(f"{d['mos_csv']}: no face found in any of its "
                                f"{len(mos_rows)} images (first: {missed[0][0]}: "
                                f"{missed[0][1]})")
        _warn_held_out(d["mos_csv"], [p for p, _ in mos_rows], [p for _, p in val_items])
        if missed:
            log.warning("%s: %d of %d images left out (%s)", d["mos_csv"], len(missed),
                        len(mos_rows), "; ".join(f"{p}: {r}" for p, r in missed[:3])
                        + ("; ..." if len(missed) > 3 else ""))
    images = unlabelled_images(d["unlabelled"])
    skipped: list[tuple[str, str]] = []
    sources = detect_sources([(None, p) for p in images], detector, all_faces=True,
                             skipped=skipped)
    if skipped:
        log.warning("data: %d of %d unlabelled images left out (%s); all in labels.json",
                    len(skipped), len(images), "; ".join(f"{p}: {r}" for p, r in skipped[:3])
                    + ("; ..." if len(skipped) > 3 else ""))
    set_a, set_b = _split(sources)
    # self-training would have nothing new (set B also takes labelled copies, if asked)
    if not set_a or not (set_b or d.get("b_labelled_variants")):
        raise FiqaGateError(
            f"data: the unlabelled sources ({', '.join(map(str, d['unlabelled'])) or 'none'})"
            f" give {len(sources)} faces, so set A has {len(set_a)} and set B {len(set_b)}; "
            "self-training needs faces in each: add folders of face pictures to "
            "data.unlabelled"
            + (f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    plan = memory_plan(cfg, {**{k: len(v) for k, v in found.items()},
                             "unlabelled_a": len(set_a), "unlabelled_b": len(set_b)},
                       sum(f.image.nbytes for group in (sources, *found.values())
                           for f in group))
    report["memory_plan"] = plan
    log.info("data: %d faces, %.1f GiB of crops; the run needs about %.1f GiB", plan["faces"],
             plan["crops_gib"], plan["peak_gib"])
    if d.get("memory_check", True):
        check_memory(plan)

    for name, variants, s in (("labelled_train", d["variants"], seed),
                              ("labelled_val", d["variants"], seed + 1)):
        samples = build_samples(found[name], detector, variants, s, progress=name)
        emb, norms = recognizer.embed_with_norms(samples.crops)
        # the teachers' fusion input (training/teacher.py), from the labels' own SFace pass
        atomic_save_array(norms_file(out, name), norms)
        if name == "labelled_val":  # the students' validator compares these faces
            atomic_save_array(embeddings_file(out, name), emb)
        label, matched, _ = utility_labels(samples, emb, recognizer.threshold,
                                           d["temperature"])
        samples.extra.update(label=label, matched=matched)
        samples.save(out / f"{name}.npz")
        report[name] = {"faces": len(samples), "sources": len(found[name]),
                        "skipped": skipped_of[name], "label_mean": float(label.mean()),
                        "label_histogram": np.histogram(label, 10, (0, 1))[0].tolist()}
        log.info("%s: %d faces from %d images", name, len(samples), len(found[name]))
        if name == "labelled_val":
            report["label_edc_val"] = label_edc(samples, emb, label)

    if mos_rows:
        scores = np.asarray([m for _, m in mos_rows])
        lo, hi = float(scores.min()), float(scores.max())
        by_path = {str(p): (m - lo) / max(hi - lo, 1e-9) for p, m in mos_rows}
        mos = build_samples(found["mos"], detector, 0, seed)
        mos.extra.update(label=np.asarray([by_path[s] for s in mos.source]),
                         matched=np.full(len(mos), np.nan))
        mos.save(out / "mos.npz")
        report["mos"] = {"faces": len(mos), "range": [lo, hi]}

    for name, part, s, kinds in (("unlabelled_a", set_a, seed + 2, degradations.KINDS),
                                 ("unlabelled_b", set_b, seed + 3, b_kinds)):
        samples = build_samples(part, detector, d["unlabelled_variants"], s, progress=name,
                                redetect=False, kinds=kinds)
        report[name] = {"faces": len(samples), "source_faces": len(part),
                        "kinds": list(kinds)}
        if name == "unlabelled_b" and d.get("b_labelled_variants"):
            samples = Samples.concat([samples, _unlabelled_copies(
                found["labelled_train"], detector, d["b_labelled_variants"], seed + 4,
                kinds)])
            report[name] |= {"faces": len(samples),
                             "labelled_sources": len(found["labelled_train"])}
        samples.save(out / f"{name}.npz")
        log.info("%s: %d faces from %d source faces", name, len(samples), len(part))
    report["unlabelled_images"] = len(images)
    report["unlabelled_skipped"] = len(skipped)
    report["unlabelled_left_out"] = skipped
    atomic_write_json(out / "labels.json", report)
    return report


CROP_BYTES = ALIGNED_SIZE * ALIGNED_SIZE * 3
GiB = 1024 ** 3
# Interpreter, torch, ONNX Runtime sessions, models, and what earlier stages of the same
# process leave behind. Measured: the CPU recipe's student stage run alone peaked at 6.23
# GiB where the rest of the plan counts 4.57; every stage of a small config on a 2,400-image
# folder (one epoch each) at 3.77 where it counts 1.18.
OVERHEAD = int(2.75 * GiB)


def trunk_view_bytes(spec: dict[str, Any]) -> int:
    """Bytes per face of the frozen-trunk views a teacher caches (face and mirror, float16);
    0 for a teacher trained whole."""
    if not int(spec.get("freeze", 0)):
        return 0
    import torch
    from fiqa_gate_training.models import build_model
    from fiqa_gate_training.train import split

    trunk = split(build_model(spec), int(spec["freeze"]))[0]
    assert trunk is not None
    size = int(spec["input_size"])
    with torch.no_grad():
        return 2 * 2 * trunk(torch.zeros(1, 3, size, size)).numel()


def memory_plan(cfg: dict[str, Any], sources: dict[str, int], source_bytes: int
                ) -> dict[str, Any]:
    """Faces per set and the memory a run of `cfg` holds at its peak, from the number of
    source faces per set. The data stage holds the source images and, at most, set B twice
    (while its two parts are joined); the student stage holds every set's crops, its
    joined distillation set and the teachers' trunk views (the hint reads them)."""
    d = cfg["data"]
    per_labelled, per_unlabelled = 1 + int(d["variants"]), 1 + int(d["unlabelled_variants"])
    faces = {"labelled_train": sources["labelled_train"] * per_labelled,
             "labelled_val": sources["labelled_val"] * per_labelled,
             "mos": sources.get("mos", 0),
             "unlabelled_a": sources["unlabelled_a"] * per_unlabelled,
             "unlabelled_b": (sources["unlabelled_b"] * per_unlabelled
                              + sources["labelled_train"] * int(d.get("b_labelled_variants", 0)))}
    total = sum(faces.values())
    distilled = total - faces["labelled_val"]  # every set but validation
    viewed = distilled - faces["unlabelled_b"]  # the sets the teachers train on
    if cfg["student"].get("hint", {}).get("set_b"):  # the hint's own views of set B
        viewed += faces["unlabelled_b"]
    views = viewed * trunk_view_bytes(cfg["teacher"])
    data_peak = source_bytes + 2 * faces["unlabelled_b"] * CROP_BYTES
    train_peak = (total + distilled) * CROP_BYTES + views
    peak = max(data_peak, train_peak) + OVERHEAD
    return {"faces_per_set": faces, "faces": total, "crops_gib": total * CROP_BYTES / GiB,
            "trunk_views_gib": views / GiB, "peak_gib": peak / GiB}


def available_memory() -> int | None:
    """Bytes this process can still get: MemAvailable, or a cgroup limit if lower."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if cap != "max":
            limits.append(int(cap) - used)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def check_memory(plan: dict[str, Any], available: int | None = None) -> None:
    """Refuse a run that cannot fit, before its long data stage starts."""
    available = available_memory() if available is None else available
    if available is None or plan["peak_gib"] * GiB <= available:
        return
    per_set = ", ".join(f"{k} {v}" for k, v in plan["faces_per_set"].items() if v)
    raise FiqaGateError(
        f"this run would need about {plan['peak_gib']:.1f} GiB of memory ({plan['faces']} "
        f"aligned faces: {per_set}; trunk views {plan['trunk_views_gib']:.1f} GiB) and "
        f"{available / GiB:.1f} GiB are available. Lower data.variants, "
        "data.unlabelled_variants or data.b_labelled_variants in the config, train on part "
        "of the folder, or set data.memory_check to false to try anyway.")


def distillation_kinds(d: dict[str, Any]) -> tuple[str, ...]:
    """The degradations of set B: the labelled sets' kinds plus `data.b_extra_kinds`."""
    extra = tuple(d.get("b_extra_kinds", ()))
    unknown = [k for k in extra if k not in degradations.ALL_KINDS]
    if unknown:
        raise FiqaGateError(f"data.b_extra_kinds: unknown degradation(s) {', '.join(unknown)}; "
                            f"known: {', '.join(degradations.ALL_KINDS)}")
    return tuple(dict.fromkeys(degradations.KINDS + extra))  # in order, each once


def _unlabelled_copies(sources: list, detector: Any, variants: int, seed: int,
                       kinds: tuple[str, ...] = degradations.KINDS) -> Samples:
    """Fresh degradations of the labelled training images, identity and label dropped.

    Set B's own images are few (67 faces in the CPU recipe); the labelled images with new
    degradation draws (another seed) give the distillation more variety than repeating
    the same crops, and the enhanced teacher labels them as any unlabelled face.
    """
    anonymous = [replace(s, identity=None) for s in sources]
    return build_samples(anonymous, detector, variants, seed, include_clean=False,
                         progress="unlabelled_b (labelled images)", redetect=False,
                         kinds=kinds)


def label_edc(samples: Samples, embeddings: np.ndarray, label: np.ndarray) -> dict[str, Any]:
    """How close ordering by the label comes to the oracle EDC (validation identities)."""
    a, b, mated = verification_pairs(samples.identity, samples.source, samples.clean)
    sim = similarities(embeddings, a, b)
    res = edc(sim, mated, pair_quality(label[a], label[b]))
    rnd = np.random.default_rng(0).random(len(label))
    res_rnd = edc(sim, mated, pair_quality(rnd[a], rnd[b]))
    return {"pauc_norm": {str(k): v for k, v in res.pauc_norm.items()},
            "oracle_pauc_norm": {str(k): v for k, v in res.oracle_pauc_norm.items()},
            "random_pauc_norm": {str(k): v for k, v in res_rnd.pauc_norm.items()},
            "e0": res.e0, "tau": res.tau, "fmr_target": res.fmr_target,
            "n_mated": res.n_mated, "n_nonmated": res.n_nonmated}
