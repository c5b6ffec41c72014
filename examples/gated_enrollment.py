"""Hook fiqa-gate into an enrollment pipeline you already have.

Your pipeline: detect -> align -> embed -> add to your own FAISS index. The gate goes
between alignment and embedding via `Gate.wrap`, so a rejected face costs no embedding.

    python examples/gated_enrollment.py PEOPLE_DIR [--scorer student] [--threshold 0.5]

PEOPLE_DIR/<identity>/ holds each person's images (sub-folders too). Prints what was
enrolled and what was kept out.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np

from fiqa_gate import registry
from fiqa_gate.errors import FiqaGateError
from fiqa_gate.faces import Face
from fiqa_gate.gate import Gate
from fiqa_gate.images import identity_folders
from fiqa_gate.pipeline import faces_from_file, primary_face


class MyEnrollmentPipeline:
    """Stands for the code you already run: a FAISS index and a list of labels."""

    def __init__(self, embed: Callable[[Sequence[Face]], list[np.ndarray | None]],
                 dim: int) -> None:
        self.embed = embed
        self.index = faiss.IndexFlatIP(dim)
        self.labels: list[str] = []

    def enroll(self, identity: str, faces: Sequence[Face]) -> int:
        embeddings = self.embed(faces)
        # The gated embed returns None for rejected faces: they never reach the index.
        kept = [e for e in embeddings if e is not None]
        if kept:
            self.index.add(np.stack(kept).astype(np.float32))
            self.labels += [identity] * len(kept)
        return len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("people", type=Path)
    parser.add_argument("--scorer", default="student")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()

    detector = registry.get_detector("yunet")
    recognizer = registry.get_recognizer("sface")
    gate = Gate(registry.get_scorer(args.scorer), threshold=args.threshold, stage="enroll")
    pipeline = MyEnrollmentPipeline(gate.wrap(recognizer.embed), recognizer.dim)

    for person, images in identity_folders(args.people):  # <identity>/**/<images>
        faces = []
        for image in images:
            try:
                faces.append(primary_face(faces_from_file(image, detector)))
            except FiqaGateError as exc:
                print(f"skip {image}: {exc}")
        n = pipeline.enroll(person, faces)
        for face, d in zip(faces, pipeline.embed.last_decisions, strict=True):
            if not d.accepted:
                print(f"kept out {face.source}: {d.reason}")
        print(f"{person}: enrolled {n} of {len(faces)}")
    print(f"index holds {pipeline.index.ntotal} faces of {len(set(pipeline.labels))} people")


if __name__ == "__main__":
    main()
