"""Shared helpers for the benchmarks in bench/: machine facts, versions, interleaved timing, tables.

Timing is round-robin: every repetition runs each contender once, in a rotated order, so slow
phases of a noisy (shared) machine hit all contenders alike instead of whichever ran then.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    """Progress goes to stderr with a timestamp; stdout stays free for the final table."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


# -- machine and versions -----------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (what `nproc` prints)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def physical_cores() -> int | None:
    """Distinct (package, core) pairs among the usable CPUs, from sysfs; None where unknown.

    ONNX Runtime's default intra-op pool has one thread per physical core.
    """
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(cores)


def load_average() -> str:
    """The 1/5/15-minute load averages (runnable processes; above the core count = contention)."""
    return "/".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def thread_environment() -> str:
    """The environment variables that steer OpenMP/MKL thread pools, as set (or 'none set')."""
    names = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "OMP_PROC_BIND")
    found = [f"{name}={os.environ[name]}" for name in names if name in os.environ]
    return ", ".join(found) or "none set"


def versions(*distributions: str) -> dict[str, str]:
    """Installed version of each distribution ("not installed" where missing)."""
    found = {}
    for name in distributions:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def header_lines(title: str, distributions: Sequence[str], notes: Sequence[str] = ()) -> list[str]:
    """Markdown header: title, date, machine, versions, then free-form notes as bullets."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    found = ", ".join(f"{name} {version}" for name, version in versions(*distributions).items())
    lines = [
        f"# {title}",
        "",
        f"- Date: {now}",
        f"- Machine: {cpu_model()}, `nproc` = {usable_cpus()} (physical cores: {physical_cores() or 'unknown'}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- Versions: {found}",
    ]
    return lines + [f"- {note}" for note in notes]


# -- timing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contender:
    name: str
    run: Callable[[], object]


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p90_ms: float
    samples: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = np.asarray(seconds) * 1e3
        return cls(float(np.median(ms)), float(np.percentile(ms, 90)), len(ms))


@dataclass(frozen=True)
class PairedRatio:
    """A contender's time over the baseline's in the same round, over the rounds (median, 10th and 90th
    percentile): the two calls of a round lie a few hundred ms apart, so a slow spell of a shared machine
    that spans them cancels out, as it does not in the ratio of two medians taken over different rounds."""

    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, seconds: Sequence[float], baseline: Sequence[float]) -> PairedRatio:
        ratios = np.asarray(seconds) / np.asarray(baseline)
        return cls(float(np.median(ratios)), float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90)))


def interleaved(contenders: Sequence[Contender], runs: int, warmup: int, pause_s: float = 0.0) -> dict[str, list[float]]:
    """Wall seconds per contender: ``warmup`` untimed rounds, then ``runs`` timed rounds.

    Each round runs every contender once, starting one further along the list than the last
    round, so each contender takes each position equally often. Before every call (untimed):
    a garbage collection and ``pause_s`` of sleep, so that thread pools still spinning from the
    previous contender (ONNX Runtime, OpenMP) have gone idle and do not steal its cores.
    """
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    total = warmup + runs
    for round_index in range(total):
        shift = round_index % len(contenders)
        for contender in [*contenders[shift:], *contenders[:shift]]:
            gc.collect()
            if pause_s:
                time.sleep(pause_s)
            start = time.perf_counter()
            contender.run()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[contender.name].append(elapsed)
        if round_index + 1 == warmup:
            log.info("  warm-up done (%d rounds)", warmup)
        elif round_index >= warmup and (round_index - warmup + 1) % 5 == 0:
            log.info("  %d/%d timed rounds", round_index - warmup + 1, runs)
    return times


# -- tables -------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> list[str]:
    """A GitHub markdown table; ``right[i]`` right-aligns column i (numbers)."""
    right = right or [False] * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines
