"""Stage 0: the training data, and the recognition-derived labels.

Label definition (what the shipped score means). For a face x of identity i, let R(x)
be the clean faces of identity i cut from *other* source images (the "good references").
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

import json
import logging
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fiqa_gate.datasets import (
    ORL_TRAIN,
    ORL_VAL,
    Samples,
    build_samples,
    detect_sources,
    identity_folder,
    orl_items,
    read_mos_csv,
    source_key,
)
from fiqa_gate.evaluation.metrics import edc, pair_quality
from fiqa_gate.evaluation.protocol import similarities, verification_pairs
from fiqa_gate.registry import get_detector, get_recognizer

log = logging.getLogger("fiqa_gate.training")


def reference_pairs(samples: Samples) -> tuple[np.ndarray, np.ndarray]:
    """(face index, reference index) for every face and each of its good references."""
    ident = np.asarray([str(x) for x in samples.identity])
    src = np.asarray(samples.source)
    # each identity's clean faces, found once: a large folder has many identities
    refs_of: dict[str, list[int]] = {}
    for i in np.flatnonzero(samples.clean):
        refs_of.setdefault(ident[i], []).append(int(i))
    faces, refs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for i in range(len(samples)):
        r = np.asarray(refs_of.get(ident[i], []), dtype=np.int64)
        r = r[src[r] != src[i]]
        faces.append(np.full(len(r), i, dtype=np.int64))
        refs.append(r)
    return np.concatenate(faces), np.concatenate(refs)


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


def build(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write labelled_train/labelled_val/unlabelled_a/unlabelled_b .npz and labels.json."""
    from fiqa_gate_training.sources import unlabelled_images
    from fiqa_gate_training.teacher import norms_file

    d = cfg["data"]
    detector = get_detector(d.get("detector", "yunet"))
    recognizer = get_recognizer(d["recognizer"])
    seed = int(d["seed"])
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"recognizer": d["recognizer"], "threshold": recognizer.threshold}

    labelled = d["labelled"]
    if labelled == "orl":
        train_items = orl_items(d.get("train_identities", ORL_TRAIN))
        val_items = orl_items(d.get("val_identities", ORL_VAL))
    elif labelled.startswith("identity:"):
        items = identity_folder(labelled.split(":", 1)[1])
        names = sorted({i for i, _ in items})
        val_names = {n for n in names if zlib.crc32(n.encode()) % 5 == 0}
        train_items = [x for x in items if x[0] not in val_names]
        val_items = [x for x in items if x[0] in val_names]
    else:
        raise ValueError(f"data.labelled: 'orl' or 'identity:/path', not {labelled!r}")

    train_sources: list = []
    for name, items, variants, s in (("labelled_train", train_items, d["variants"], seed),
                                     ("labelled_val", val_items, d["variants"], seed + 1)):
        skipped: list[tuple[str, str]] = []
        sources = detect_sources(items, detector, skipped=skipped)
        if name == "labelled_train":
            train_sources = sources
        samples = build_samples(sources, detector, variants, s, progress=name)
        emb, norms = recognizer.embed_with_norms(samples.crops)
        # the teachers' fusion input (training/teacher.py), from the labels' own SFace pass
        np.save(norms_file(out, name), norms)
        if name == "labelled_val":  # the students' validator compares these faces
            np.save(embeddings_file(out, name), emb)
        label, matched, _ = utility_labels(samples, emb, recognizer.threshold,
                                           d["temperature"])
        samples.extra.update(label=label, matched=matched)
        samples.save(out / f"{name}.npz")
        report[name] = {"faces": len(samples), "sources": len(sources), "skipped": skipped,
                        "label_mean": float(label.mean()),
                        "label_histogram": np.histogram(label, 10, (0, 1))[0].tolist()}
        log.info("%s: %d faces from %d images", name, len(samples), len(sources))
        if name == "labelled_val":
            report["label_edc_val"] = label_edc(samples, emb, label)

    if d.get("mos_csv"):  # a user's human-labelled faces join the labelled training set
        rows = read_mos_csv(d["mos_csv"], d.get("mos_root"))
        scores = np.asarray([m for _, m in rows])
        lo, hi = float(scores.min()), float(scores.max())
        sources = detect_sources([(None, p) for p, _ in rows], detector)
        by_path = {str(p): (m - lo) / max(hi - lo, 1e-9) for p, m in rows}
        mos = build_samples(sources, detector, 0, seed)
        mos.extra.update(label=np.asarray([by_path[s] for s in mos.source]),
                         matched=np.full(len(mos), np.nan))
        mos.save(out / "mos.npz")
        report["mos"] = {"faces": len(mos), "range": [lo, hi]}

    images = unlabelled_images(d["unlabelled"])
    skipped = []
    sources = detect_sources([(None, p) for p in images], detector, all_faces=True,
                             skipped=skipped)
    set_a, set_b = _split(sources)
    for name, part, s in (("unlabelled_a", set_a, seed + 2), ("unlabelled_b", set_b, seed + 3)):
        samples = build_samples(part, detector, d["unlabelled_variants"], s, progress=name,
                                redetect=False)
        report[name] = {"faces": len(samples), "source_faces": len(part)}
        if name == "unlabelled_b" and d.get("b_labelled_variants"):
            samples = Samples.concat([samples, _unlabelled_copies(
                train_sources, detector, d["b_labelled_variants"], seed + 4)])
            report[name] |= {"faces": len(samples), "labelled_sources": len(train_sources)}
        samples.save(out / f"{name}.npz")
        log.info("%s: %d faces from %d source faces", name, len(samples), len(part))
    report["unlabelled_images"] = len(images)
    report["unlabelled_skipped"] = len(skipped)
    (out / "labels.json").write_text(json.dumps(report, indent=2))
    return report


def _unlabelled_copies(sources: list, detector: Any, variants: int, seed: int) -> Samples:
    """Fresh degradations of the labelled training images, identity and label dropped.

    Set B's own images are few (67 faces in the CPU recipe); the labelled images with new
    degradation draws (another seed) give the distillation more variety than repeating
    the same crops, and the enhanced teacher labels them as any unlabelled face.
    """
    anonymous = [replace(s, identity=None) for s in sources]
    return build_samples(anonymous, detector, variants, seed, include_clean=False,
                         progress="unlabelled_b (labelled images)", redetect=False)


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
