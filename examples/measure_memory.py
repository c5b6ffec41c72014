"""Does scoring a big folder stream? Peak memory and open files of `fiqa-gate score`.

    python examples/measure_memory.py --n 20000 [--scorer student]

Writes N small aligned face crops (ORL faces with per-file noise) to a temporary folder,
runs `fiqa-gate score --aligned` on it as a subprocess, samples /proc/<pid>/status and
/proc/<pid>/fd while it runs, and prints peak RSS, the most file descriptors open at once,
wall time and the rows written. Run it with two sizes: a flat RSS means streaming.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_crops(folder: Path, n: int) -> None:
    from fiqa_gate.datasets import ORL_TEST, orl_items

    faces = [np.asarray(Image.open(p).convert("RGB").resize((112, 112)))
             for _, p in orl_items(ORL_TEST)]
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        noise = rng.integers(-8, 9, (112, 112, 3))
        img = np.clip(faces[i % len(faces)].astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(sub / f"{i:06d}.png", compress_level=1)


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(folder: Path, scorer: str) -> dict[str, float]:
    out = folder.parent / "scores.csv"
    cmd = [sys.executable, "-m", "fiqa_gate", "score", str(folder), "--aligned",
           "--scorer", scorer, "--output", str(out)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_rss = max_fds = 0
    rss_trace = []
    while proc.poll() is None:
        try:
            peak_rss = max(peak_rss, _status_kb(proc.pid, "VmHWM"))
            rss_trace.append(_status_kb(proc.pid, "VmRSS"))
            max_fds = max(max_fds, len(os.listdir(f"/proc/{proc.pid}/fd")))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.05)
    proc.wait()
    with open(out, newline="") as fh:
        rows = sum(1 for _ in csv.DictReader(fh))
    half = len(rss_trace) // 2
    return {"files": sum(1 for _ in folder.rglob("*.png")), "rows": rows,
            "exit_code": proc.returncode, "wall_s": time.time() - t0,
            "peak_rss_mb": peak_rss / 1024, "max_open_fds": max_fds,
            "rss_mb_mid_run": (rss_trace[half] / 1024) if rss_trace else 0.0,
            "rss_mb_end": (rss_trace[-1] / 1024) if rss_trace else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--scorer", default="student")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "crops"
        folder.mkdir()
        t0 = time.time()
        write_crops(folder, args.n)
        print(f"wrote {args.n} crops in {time.time() - t0:.0f} s", file=sys.stderr)
        for key, value in measure(folder, args.scorer).items():
            print(f"{key:16s} {value:.1f}" if isinstance(value, float) else f"{key:16s} {value}")


if __name__ == "__main__":
    main()
