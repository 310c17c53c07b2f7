"""A small version of bench/serve_load.py: concurrent clients, no errors, the batcher really batching."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from explainrt.serve.launcher import ServerProcess

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_small_load_has_no_errors_and_batches(tmp_path: Path) -> None:
    bench = load_bench()
    arguments = ["--max-batch", "8", "--max-queue-ms", "20"]
    with ServerProcess(arguments, env=dict(os.environ), log_path=tmp_path / "server.log") as server:
        result = bench.run_load(server, clients=8, requests=40, warmup_rounds=1)
        assert server.alive()
    assert result.errors == []
    assert len(result.latencies) == 40
    assert result.batched_images == 40  # every request (one image each) went through a batch, counted once
    assert result.mean_batch > 1
    assert abs(result.memory_change) < 0.10
    report = bench.markdown(result, arguments)
    assert "| errors | 0 |" in report and "mean batch size" in report


def test_the_memory_check_catches_a_leak() -> None:
    """The two windows are disjoint even for few requests, so growth between them shows."""
    bench = load_bench()
    steady = bench.LoadResult(clients=1, requests=40, method="gradcam", seconds=1.0,
                              rss=[500 * 2**20 + (i % 3) * 2**20 for i in range(40)])
    assert abs(steady.memory_change) < 0.01
    leaking = bench.LoadResult(clients=1, requests=40, method="gradcam", seconds=1.0,
                               rss=[500 * 2**20 + i * 5 * 2**20 for i in range(40)])  # 5 MB per request
    first, last = leaking.memory_window()
    assert first == 500 * 2**20 + 9.5 * 5 * 2**20 and last == 500 * 2**20 + 29.5 * 5 * 2**20
    assert leaking.memory_change > 0.10  # the threshold test_small_load_has_no_errors_and_batches applies
    long_run = bench.LoadResult(clients=1, requests=400, method="gradcam", seconds=1.0, rss=list(range(1, 401)))
    assert long_run.memory_window() == (50.5, 350.5)  # MEMORY_WINDOW (100) requests at each end
