"""Micro-benchmark of `explainrt.kernels.cam_maps`: NumPy reference vs the C++/OpenMP backend.

Median of 20 timed runs (after one warm-up) on typical Grad-CAM shapes; writes
bench/results/kernels.md. Run from the repository root: `python bench/kernels.py`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from explainrt.kernels import cam_maps

RUNS = 20
CASES = [((8, 2048, 7, 7), (224, 224)), ((1, 1280, 7, 7), (224, 224))]
RESULTS = Path(__file__).parent / "results" / "kernels.md"


def median_ms(run: Callable[[], object]) -> float:
    """Median wall time of `run` in milliseconds."""
    run()
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    lines = [
        "# `cam_maps`: NumPy vs C++ (per-channel weights, float32)",
        "",
        f"Median of {RUNS} runs; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        "| activations [N, C, h, w] | output | numpy (ms) | cpp (ms) | speedup |",
        "|---|---|---:|---:|---:|",
    ]
    for shape, out_hw in CASES:
        activations = rng.standard_normal(shape, dtype=np.float32)
        weights = rng.standard_normal(shape[:2], dtype=np.float32)
        numpy_ms, cpp_ms = (
            median_ms(lambda b=backend: cam_maps(activations, weights, out_hw, backend=b))
            for backend in ("numpy", "cpp")
        )
        lines.append(
            f"| {list(shape)} | {shape[0]}x{out_hw[0]}x{out_hw[1]} | {numpy_ms:.3f} | "
            f"{cpp_ms:.3f} | {numpy_ms / cpp_ms:.1f}x |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
