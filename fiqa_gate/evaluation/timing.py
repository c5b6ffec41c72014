"""Wall-clock measurement: medians over repeats, per face, after a warm-up."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def machine() -> str:
    """What every measurement is stamped with."""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


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


def measure(name: str, run: Callable[[], object], faces_per_call: int, repeats: int = 7,
            warmup: int = 2, min_seconds: float = 0.2) -> Timing:
    """Median time per face of `run()`, each repeat looping until `min_seconds` pass."""
    for _ in range(warmup):
        run()
    per_face = []
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            run()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        per_face.append(elapsed * 1000 / (calls * faces_per_call))
    med = statistics.median(per_face)
    return Timing(name, faces_per_call, med, 1000 / med, repeats, (min(per_face), max(per_face)))
