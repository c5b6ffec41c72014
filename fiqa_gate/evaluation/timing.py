"""Wall-clock measurement: medians over repeats, per face, after a warm-up."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def machine() -> str:
    """What every measurement is stamped with."""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def versions() -> dict[str, str]:
    """The installed versions of the packages whose numbers a measurement or a training
    run depends on (floating-point kernels differ between releases, as between hosts)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("numpy", "onnxruntime", "onnx", "opencv-python", "torch", "timm"):
        with contextlib.suppress(PackageNotFoundError):  # torch, timm: the [train] extra
            found[name] = version(name)
    return found


@dataclass(frozen=True)
class Timing:
    name: str
    batch: int
    ms_per_face: float  # median over repeats
    faces_per_s: float
    repeats: int
    spread: tuple[float, float]  # min and max ms per face over repeats

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "batch": self.batch, "ms_per_face": self.ms_per_face,
                "faces_per_s": self.faces_per_s, "repeats": self.repeats,
                "min_ms_per_face": self.spread[0], "max_ms_per_face": self.spread[1]}


def measure_all(jobs: Sequence[tuple[str, Callable[[], object], int]], repeats: int = 7,
                warmup: int = 2, min_seconds: float = 0.2) -> dict[str, Timing]:
    """Median time per face of each job's `run()` (each repeat loops a job until
    `min_seconds` pass), the jobs taken in turn within each repeat (round robin).

    On a shared machine the speed drifts over tens of seconds; timed one after another,
    a ratio of two rows compares two different moments. In turns, every row sees the
    same moments, and a job's warm-up call each turn absorbs what the previous job left
    (caches, another session's spinning threads)."""
    for _, run, _ in jobs:
        for _ in range(warmup):
            run()
    per_face: dict[str, list[float]] = {name: [] for name, _, _ in jobs}
    for _ in range(repeats):
        for name, run, faces in jobs:
            run()
            calls, t0 = 0, time.perf_counter()
            while True:
                run()
                calls += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_seconds:
                    break
            per_face[name].append(elapsed * 1000 / (calls * faces))
    out = {}
    for name, _, faces in jobs:
        times = per_face[name]
        med = statistics.median(times)
        out[name] = Timing(name, faces, med, 1000 / med, repeats, (min(times), max(times)))
    return out
