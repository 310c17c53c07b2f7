"""Throughput of explainrt's occlusion and RISE against raw ONNX Runtime, Captum and plain PyTorch.

Run from the repository root (about 10 minutes on 2 busy cores; ``--quick``: 2-3 minutes):

    python bench/perturbation.py [--quick] [--models resnet50,default] [--out bench/results/perturbation.md]

Models as in bench/latency.py: ResNet-50 (torchvision, random init, fixed seed) and the shipped
default (EfficientNet-Lite0, ImageNet weights), 224x224, one random image, CPU only. The
contenders run side by side, interleaved round-robin (``bench.common.interleaved``: a few rounds,
each running every contender once in a rotated order, so a busy phase of a shared machine hits
all alike); the table shows medians:

- ``ort plain``: batched throughput of ONNX Runtime on the plain export, batch 16 (images/s);
- ``explainrt occlusion`` / ``explainrt rise``: ``Explainer(model, [layer]).explain(x, ...)`` with
  batch_size 16, end to end; forward passes/s counts every model input the method ran (windows
  or masks, plus the unperturbed image). Occlusion runs by default with exact incremental
  inference (only the box each window reaches is recomputed, so it evaluates windows faster than
  the runtime runs whole images); ``explainrt occlusion, full passes`` (``incremental=False``)
  runs one whole forward pass per window and measures the runner's overhead;
- ``captum occlusion``: ``captum.attr.Occlusion(model).attribute`` on the same window, stride,
  baseline and target, ``perturbations_per_eval=16``, torch eager;
- ``torch rise``: the RISE reference code's method as a plain PyTorch loop (random grids,
  bilinear upsampling with ``F.interpolate``, random crops, softmax, weighted sum), 16 masks per
  forward pass, masks made batch by batch.

RISE runs 160 masks here (quick: 48). Then RISE's peak memory on the default model at a small
and a large N (500 and 8000; quick: 100 and 1000): tracemalloc's peak (NumPy and Python allocations) and the peak resident set growth
(sampled every 5 ms) of the whole process (models and sessions included) while the run lasts,
against what storing all N masks (as the reference code does) would take.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    Contender,
    header_lines,
    interleaved,
    load_average,
    markdown_table,
    setup_logging,
    usable_cpus,
)
from bench.latency import SIZE, Model, load_model, plain_session  # noqa: E402
from explainrt import kernels  # noqa: E402
from explainrt.explainer import Explainer  # noqa: E402
from explainrt.runtime.incremental import IncrementalModel  # noqa: E402

log = logging.getLogger("bench.perturbation")

BATCH = 16
GRID, P = 7, 0.5
TARGET_THROUGHPUT = 0.90  # issue 3, section 7: explainrt >= 90 % of raw runtime throughput
TARGET_SPEEDUP = 3.0  # ... and >= 3x Captum's Occlusion on the same settings


@dataclass(frozen=True)
class Settings:
    window: int
    stride: int
    rise_masks: int
    memory_masks: tuple[int, int]
    ort_calls: int  # plain ORT batches per timed call
    runs: int
    warmup: int


FULL = Settings(window=32, stride=16, rise_masks=160, memory_masks=(500, 8000), ort_calls=4, runs=3, warmup=1)
QUICK = Settings(window=56, stride=28, rise_masks=48, memory_masks=(100, 1000), ort_calls=2, runs=2, warmup=1)
ORT = "ort plain"
OCCLUSION = "explainrt occlusion"
OCCLUSION_FULL = "explainrt occlusion, full passes"


@dataclass(frozen=True)
class Row:
    model: str
    contender: str
    passes: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.passes / self.seconds


def plain_batch_run(model: Model, calls: int, seed: int) -> Callable[[], object]:
    """``calls`` runs of plain ONNX Runtime on one random batch of BATCH images."""
    session = plain_session(model)
    name = session.get_inputs()[0].name
    batch = np.random.default_rng(seed).standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
    return lambda: [session.run(None, {name: batch}) for _ in range(calls)]


def timed(run) -> tuple[float, object]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def torch_rise(module: torch.nn.Module, x: torch.Tensor, target: int, n_masks: int, seed: int) -> torch.Tensor:
    """The RISE reference code's method as a plain PyTorch loop, masks made BATCH at a time."""
    generator = torch.Generator().manual_seed(seed)
    cell = -(-SIZE // GRID)
    saliency = torch.zeros(SIZE * SIZE, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n_masks, BATCH):
            count = min(BATCH, n_masks - start)
            grids = (torch.rand(count, 1, GRID, GRID, generator=generator) < P).float()
            up = F.interpolate(grids, size=((GRID + 1) * cell,) * 2, mode="bilinear", align_corners=False)
            shifts = torch.randint(0, cell, (count, 2), generator=generator)
            masks = torch.stack([up[i, 0, dy : dy + SIZE, dx : dx + SIZE]
                                 for i, (dy, dx) in enumerate(shifts.tolist())])
            scores = torch.softmax(module(x * masks[:, None]), dim=1)[:, target]
            saliency += (scores.double()[:, None] * masks.reshape(count, -1).double()).sum(dim=0)
    return (saliency / n_masks / P).reshape(SIZE, SIZE)


def bench_model(key: str, settings: Settings, seed: int) -> list[Row]:
    from captum.attr import Occlusion

    model = load_model(key, seed)
    log.info("%s: exporting", model.title)
    explainer = Explainer(model.module, [model.target])
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    image = x.numpy()
    target = int(explainer.predict(image).argmax())
    window, stride = (settings.window,) * 2, (settings.stride,) * 2
    windows = kernels.occlusion_grid((3, SIZE, SIZE), window, stride).total
    n_masks = settings.rise_masks
    theirs = Occlusion(model.module).attribute(x, sliding_window_shapes=(3, *window), strides=(3, *stride),
                                               baselines=0.0, target=target, perturbations_per_eval=BATCH)
    differences = {}
    for name, incremental in ((OCCLUSION, "auto"), (OCCLUSION_FULL, False)):
        ours = explainer.explain(image, method="occlusion", targets=[target], normalize=False, window=window,
                                 stride=stride, batch_size=BATCH, incremental=incremental)
        differences[name] = float(np.abs(theirs[0, 0].detach().numpy() - ours.maps[0]).max())
        log.info("%s: max |%s - captum| = %.1e", key, name, differences[name])
    plan = IncrementalModel.of(explainer.session).plan((SIZE, SIZE), window)
    passes = {ORT: settings.ort_calls * BATCH, OCCLUSION: windows + 1, OCCLUSION_FULL: windows + 1,
              "explainrt rise": n_masks + 1, "captum occlusion": windows + 1, "torch rise": n_masks}
    contenders = [
        Contender(ORT, plain_batch_run(model, settings.ort_calls, seed)),
        Contender(OCCLUSION, lambda: explainer.explain(
            image, method="occlusion", targets=[target], normalize=False, window=window, stride=stride,
            batch_size=BATCH)),
        Contender(OCCLUSION_FULL, lambda: explainer.explain(
            image, method="occlusion", targets=[target], normalize=False, window=window, stride=stride,
            batch_size=BATCH, incremental=False)),
        Contender("explainrt rise", lambda: explainer.explain(
            image, method="rise", targets=[target], normalize=False, n_masks=n_masks, grid=GRID, p=P,
            batch_size=BATCH)),
        Contender("captum occlusion", lambda: Occlusion(model.module).attribute(
            x, sliding_window_shapes=(3, *window), strides=(3, *stride), baselines=0.0, target=target,
            perturbations_per_eval=BATCH)),
        Contender("torch rise", lambda: torch_rise(model.module, x, target, n_masks, seed)),
    ]
    log.info("%s: %d warm-up + %d timed rounds of %d contenders", key, settings.warmup, settings.runs,
             len(contenders))
    times = interleaved(contenders, settings.runs, settings.warmup, pause_s=0.05)
    notes = {OCCLUSION: "incremental: " + (f"{len(plan.stages)} stages to `{plan.last}`, estimated "
                                           f"{plan.fraction:.0%} of full inference" if plan else "no plan"),
             "captum occlusion": "max abs diff to explainrt " + ", ".join(f"{differences[n]:.1e}" for n in differences)}
    return [Row(key, name, passes[name], float(np.median(seconds)), notes.get(name, "")) for name, seconds in times.items()]


class RssSampler:
    """Peak resident set size (bytes) of this process while active, sampled every 5 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rise_memory(settings: Settings, seed: int) -> list[list[object]]:
    """Peak memory of explainrt's RISE on the default model at the two N of ``settings``."""
    model = load_model("default", seed)
    explainer = Explainer(model.module, [model.target])
    image = np.random.default_rng(seed).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    explainer.explain(image, method="rise", n_masks=BATCH, batch_size=BATCH)  # sessions built, pools warm
    rows = [["before", "", "", f"{RssSampler.rss() / 2**20:.0f}", ""]]
    for n_masks in settings.memory_masks:
        log.info("rise memory: N=%d", n_masks)
        tracemalloc.start()
        with RssSampler() as sampler:
            seconds, _ = timed(lambda: explainer.explain(image, method="rise", n_masks=n_masks, batch_size=BATCH))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        stored = n_masks * SIZE * SIZE * 4
        rows.append([n_masks, f"{seconds:.1f}", f"{peak / 2**20:.1f}", f"{sampler.peak / 2**20:.0f}",
                     f"{stored / 2**20:.0f}"])
    return rows


def report(rows: list[Row], memory: list[list[object]], args: argparse.Namespace, settings: Settings,
           load: tuple[str, str]) -> tuple[list[str], list[str]]:
    table_rows, verdicts = [], []
    for key in dict.fromkeys(row.model for row in rows):
        mine = {row.contender: row for row in rows if row.model == key}
        raw = mine[ORT].rate
        for row in mine.values():
            overhead = f"{(raw / row.rate - 1) * 100:+.0f} %" if row.contender != ORT else ""
            table_rows.append([key, row.contender, row.passes, f"{row.seconds:.2f}", f"{row.rate:.1f}",
                               f"{row.rate / raw:.2f}", overhead, row.note])
        for name in (OCCLUSION_FULL, "explainrt rise"):
            share = mine[name].rate / raw
            verdicts.append(f"- {key}: {name} at {share:.0%} of raw ORT throughput "
                            f"(target >= {TARGET_THROUGHPUT:.0%}): "
                            f"**{'MET' if share >= TARGET_THROUGHPUT else 'NOT MET'}**")
        speedup = mine[OCCLUSION].rate / mine["captum occlusion"].rate
        verdicts.append(f"- {key}: explainrt occlusion {speedup:.1f}x Captum's (target >= {TARGET_SPEEDUP:.0f}x; "
                        f"{mine[OCCLUSION].rate / mine[OCCLUSION_FULL].rate:.2f}x from incremental inference, "
                        f"{mine[OCCLUSION_FULL].rate / mine['captum occlusion'].rate:.1f}x with full passes): "
                        f"**{'MET' if speedup >= TARGET_SPEEDUP else 'NOT MET'}**")
    table = markdown_table(["model", "contender", "forward passes", "median s", "passes/s (img/s)", "vs ort plain",
                            "overhead", "note"], table_rows, [False, False, True, True, True, True, True, False])
    memory_table = markdown_table(["N masks", "seconds", "tracemalloc peak MB", "process peak RSS MB",
                                   "all masks stored (reference code) MB"], memory, [True] * 5)
    notes = [
        "`resnet50` = ResNet-50 (torchvision, random init, seed 0); `default` = EfficientNet-Lite0 (ImageNet weights)",
        f"Input: one random float32 [1, 3, {SIZE}, {SIZE}] image; targets: the predicted class; CPU only; "
        f"batch {BATCH} everywhere; torch threads = nproc = {usable_cpus()}, ORT at its default.",
        f"Occlusion: window {settings.window}x{settings.window} over all channels, stride {settings.stride}, "
        f"baseline 0. RISE: grid {GRID}, p {P}, {settings.rise_masks} masks.",
        f"**Shared, noisy machine**: other jobs ran on the same {usable_cpus()} cores (load average 1/5/15 min at "
        f"start {load[0]}, at end {load[1]}). Timing: {settings.warmup} warm-up and {settings.runs} timed rounds, "
        "each running every contender once in a rotated order (bench.common.interleaved, 50 ms pause before each "
        "call); medians. Few rounds: ratios still carry several % of noise.",
        f"kernels backend: `{'cpp' if 'cpp' in kernels.available_backends() else 'numpy'}`.",
    ]
    lines = [
        *header_lines("Perturbation methods: explainrt occlusion and RISE vs raw ORT, Captum, plain PyTorch",
                      ("torch", "torchvision", "onnxruntime", "explainrt", "captum", "numpy"), notes),
        "", "## Throughput", "", *table, "",
        "## RISE peak memory (default model, batch 16)", "", *memory_table, "",
        "## Targets (issue 3, section 7)", "", *verdicts, "",
        f"Command: `python bench/perturbation.py{' --quick' if args.quick else ''} --models {args.models}`",
    ]
    return lines, table + [""] + memory_table + [""] + verdicts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer windows and masks (2-3 minutes)")
    parser.add_argument("--models", default="resnet50,default", help="comma-separated: resnet50, default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "perturbation.md")
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    torch.set_num_threads(usable_cpus())
    settings = QUICK if args.quick else FULL
    start_load = load_average()
    rows = [row for key in args.models.split(",") for row in bench_model(key.strip(), settings, args.seed)]
    memory = rise_memory(settings, args.seed)
    lines, summary = report(rows, memory, args, settings, (start_load, load_average()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", args.out)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
