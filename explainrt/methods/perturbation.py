"""Perturbation methods and the runner they share: masked copies of an image, scored in batches.

A perturbation method only describes its masks (batches of [b, H, W] or [b, C, H, W] arrays,
1 = keep the pixel, 0 = show the baseline) and what to do with the scores; the runner applies
them (``kernels.apply_masks``), runs the model in runtime batches, gathers the target columns,
checks for cancellation between calls and shows a progress bar. Score-CAM, LIME and KernelSHAP
use the same runner. Stable API (other method modules build on it):

- ``perturbation_budget(request, mask_channels=1) -> int``: perturbed copies per runtime call,
  ``request.batch_size`` capped by the options ``max_batch`` and ``memory_mb`` (``BUDGET_OPTIONS``).
- ``reference_logits(request) -> (logits [n, classes, ...], targets [n])``: unperturbed logits of the
  chunk and its requested targets resolved (-k = the k-th most likely class, ``numerics.class_order``).
- ``iter_perturbation_scores(request, index, batches, total, targets, baseline=0.0, *,
  probabilities=False, desc="perturbations") -> Iterator[(masks, scores [b, T])]``: each mask
  batch of image ``index`` with the scores of its copies for the classes ``targets`` [T]
  (logits, or softmax probabilities); ``total`` is the number of masks ``batches`` yields.
- ``perturbation_scores(...same...) -> np.ndarray [total, T] float32``: all scores at once.

Methods here:

- Occlusion (Zeiler & Fergus 2014, Captum's ``Occlusion``): a window slides with a stride over
  (C,) H, W; a pixel's attribution is f(x) - f(x with the window at the baseline), averaged over
  every window that covers it. Maps are the mean over channels (any channel's map when the
  window spans all channels), signed.
- RISE (Petsiuk et al. 2018): saliency = sum_i P(target | x * M_i) M_i / (N p) over N random
  masks (``kernels.rise_masks``), accumulated batch by batch as a GEMM, so memory does not grow
  with N.

Their options, with defaults, are declared in ``Occlusion.options`` and ``Rise.options``; both
take ``BUDGET_OPTIONS`` (see ``perturbation_budget``). Occlusion's ``incremental``: "auto" runs
the windows by exact incremental inference (``explainrt.runtime.incremental``, Krypton-style:
only the box a window reaches is recomputed, stage by stage) when the backend can run
sub-models and the plan saves at least 15 % of the work; True requires it (an error says why it
cannot), False always runs full forward passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from explainrt import kernels
from explainrt.errors import InvalidInputError
from explainrt.methods.base import (
    Attribution,
    AttributionRequest,
    Method,
    gaussian_blur,
    resolve_targets,
    timed,
)
from explainrt.methods.options import Choice, Integer, Number, OneOf, Option, Size
from explainrt.numerics import class_scores, softmax
from explainrt.progress import progress
from explainrt.runtime.incremental import incremental_forward
from explainrt.runtime.objective import TargetSession, scoring_only

BUDGET_OPTIONS = (
    Option("max_batch", Integer(1), None, "perturbed copies per runtime call at most (None: batch_size)"),
    Option("memory_mb", Number(above=0), None, "host memory of one batch of perturbed copies and masks at most, "
           "in MB (None: no bound)"),
)
"""Options every perturbation method takes to bound its runtime batches."""

BLUR_SIGMA = 10.0
"""Std in pixels of the Gaussian blur of the ``baseline="blur"`` occlusion (Fong & Vedaldi 2017)."""


def perturbation_budget(request: AttributionRequest, mask_channels: int = 1) -> int:
    """Perturbed copies per runtime call: ``batch_size``, at most ``max_batch``, within ``memory_mb``.

    ``memory_mb`` bounds the host memory of one batch of perturbed inputs and their masks
    (``mask_channels`` planes per copy); the runtime's own activation memory is not counted. Both
    options are validated values, absent for methods that do not take them (Score-CAM).
    """
    budget = request.batch_size
    max_batch, memory_mb = request.options.get("max_batch"), request.options.get("memory_mb")
    if max_batch is not None:
        budget = min(budget, max_batch)
    if memory_mb is not None:
        channels, height, width = request.images.shape[1:]
        per_copy = (channels + mask_channels) * height * width * 4
        fits = int(memory_mb * 2**20 // per_copy)
        if fits < 1:
            raise InvalidInputError(f"memory_mb={memory_mb} is below one perturbed copy ({per_copy / 2**20:.3f} MB)")
        budget = min(budget, fits)
    return budget


Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Logits of perturbed copies [b, C, H, W] given their masks (a faster exact way than a plain forward pass)."""


def _logits(request: AttributionRequest, images: np.ndarray, timings: dict[str, float] | None) -> np.ndarray:
    """Plain logits of ``images`` in runtime calls of at most ``batch_size``, checking cancellation."""
    parts = []
    for start in range(0, images.shape[0], request.batch_size):
        request.check_cancelled()
        with timed({} if timings is None else timings, "runtime"):
            parts.append(np.asarray(request.session.logits(images[start : start + request.batch_size])))
    return np.concatenate(parts)


def reference_logits(request: AttributionRequest, timings: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unperturbed logits [n, classes, ...] of the chunk and its targets [n] resolved (-k: k-th most likely);
    the runtime's seconds are added to ``timings["runtime"]``."""
    logits = _logits(request, request.images, timings)
    return logits, resolve_targets(request.targets, logits)


def iter_perturbation_scores(request: AttributionRequest, index: int, batches: Iterable[np.ndarray], total: int,
                             targets: np.ndarray, baseline: float | np.ndarray = 0.0, *, probabilities: bool = False,
                             desc: str = "perturbations", timings: dict[str, float] | None = None,
                             forward: Forward | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each mask batch of image ``index`` with its copies' scores [b, T] for the classes ``targets``.

    Masks ([b, H, W] or [b, C, H, W], 1 keeps the image) are applied by ``kernels.apply_masks``
    against ``baseline`` (a number or [C, H, W]); a batch larger than ``perturbation_budget``
    runs in several runtime calls, through ``forward`` if given (else the session's plain forward
    pass), timed into ``timings["runtime"]``. Scores are logits, or softmax probabilities over all
    classes when ``probabilities`` and the output is [N, classes]; on an output [N, classes, ...] (a
    segmentation map) a class's score is its map summed (``numerics.class_scores``), as for Grad-CAM.
    ``total`` (the masks ``batches`` yields) sizes the progress bar and is checked at the end.
    """
    image = request.images[index]
    columns = np.asarray(targets, dtype=np.int64).reshape(-1)
    session, picked = (request.session, columns) if forward is not None else scoring_only(request.session, columns)
    # a target object's score is its own objective (a Softmax target's is a probability already)
    probabilities = probabilities and not isinstance(request.session, TargetSession)
    runtime = {} if timings is None else timings
    seen = 0
    with progress(total, f"{desc} (image {index})", unit="copies", enabled=request.progress, leave=False) as bar:
        for masks in batches:
            scores = np.empty((masks.shape[0], columns.size), dtype=np.float32)
            budget = perturbation_budget(request, masks.shape[1] if masks.ndim == 4 else 1)
            for start in range(0, masks.shape[0], budget):
                request.check_cancelled()
                chunk = masks[start : start + budget]
                copies = kernels.apply_masks(image, chunk, baseline)
                with timed(runtime, "runtime"):
                    logits = np.asarray(session.logits(copies) if forward is None else forward(copies, chunk))
                scores[start : start + budget] = (softmax(logits) if probabilities and logits.ndim == 2
                                                  else class_scores(logits))[:, picked]
                bar.update(copies.shape[0])
            seen += masks.shape[0]
            yield masks, scores
    if seen != total:
        raise InvalidInputError(f"the mask batches held {seen} masks, not the total={total} announced")


def perturbation_scores(request: AttributionRequest, index: int, batches: Iterable[np.ndarray], total: int,
                        targets: np.ndarray, baseline: float | np.ndarray = 0.0, *, probabilities: bool = False,
                        desc: str = "perturbations", timings: dict[str, float] | None = None) -> np.ndarray:
    """Scores [total, T] float32 of every masked copy of image ``index`` (see ``iter_perturbation_scores``)."""
    parts = [scores for _, scores in iter_perturbation_scores(request, index, batches, total, targets, baseline,
                                                              probabilities=probabilities, desc=desc, timings=timings)]
    return np.concatenate(parts) if parts else np.empty((0, np.size(targets)), dtype=np.float32)


def method_timings(timings: dict[str, float], started: float) -> dict[str, float]:
    """``timings`` with "method": the seconds since ``started`` not spent in the runtime."""
    return {**timings, "method": time.perf_counter() - started - timings.get("runtime", 0.0)}


# --- Occlusion ---------------------------------------------------------------------------------


def _occlusion_baseline(value: float | str, image: np.ndarray) -> float | np.ndarray:
    """The occluding value: a number, or "blur" (the image blurred with std BLUR_SIGMA pixels)."""
    return gaussian_blur(image, BLUR_SIGMA) if value == "blur" else value


def _occlusion_batches(shape: tuple[int, int, int], grid: kernels.OcclusionGrid, budget: int) -> Iterator[np.ndarray]:
    """Keep masks of every window, ``budget`` at a time: [b, H, W] if one plane covers all channels."""
    for first in range(0, grid.total, budget):
        masks = kernels.occlusion_masks(shape, grid.window, grid.stride, first, min(budget, grid.total - first))
        yield masks[:, 0] if shape[0] == 1 else masks


class Occlusion(Method):
    """Captum's Occlusion: output drop when a sliding window is set to the baseline, averaged per pixel."""

    name = "occlusion"
    summary = "Occlusion: output drop when a sliding window is replaced by a baseline (Captum's definition)"
    options = (
        Option("window", Size(), (16, 16), "occluded window: (h, w) over all channels, or (c, h, w)"),
        Option("stride", Size(), None, "step between windows, at most the window (None: the window)"),
        Option("baseline", OneOf((Number(), Choice(("blur",)))), 0.0, "what the window shows: a number, or the "
               f"image blurred with std {BLUR_SIGMA:g} pixels"),
        Option("incremental", Choice(("auto", True, False)), "auto", "exact incremental inference: when it saves "
               "work, required, or never"),
        *BUDGET_OPTIONS,
    )
    signed = True

    def compute(self, request: AttributionRequest) -> Attribution:
        started, timings = time.perf_counter(), {}
        channels, height, width = request.images.shape[1:]
        window, stride, incremental = (request.options[name] for name in ("window", "stride", "incremental"))
        grid = kernels.occlusion_grid((channels, height, width), window, window if stride is None else stride)
        spans_channels = grid.window[0] == channels
        if spans_channels:  # one mask plane per copy serves every channel
            grid = grid._replace(window=(1, *grid.window[1:]), stride=(1, *grid.stride[1:]))
        shape = (1 if spans_channels else channels, height, width)
        logits, targets = reference_logits(request, timings)
        budget = perturbation_budget(request, shape[0])
        maps = np.empty((request.images.shape[0], height, width), dtype=np.float32)
        for index in range(request.images.shape[0]):
            baseline = _occlusion_baseline(request.options["baseline"], request.images[index])
            reference = class_scores(logits)[index, targets[index]]
            forward = None
            if incremental is not False:
                with timed(timings, "runtime"):
                    forward = incremental_forward(request.session, request.images[index], grid.window[1:],
                                                  required=incremental is True)
            sums = np.zeros((2, shape[0] * height, width))  # float64: sum of drop * window, sum of window
            for masks, scores in iter_perturbation_scores(request, index, _occlusion_batches(shape, grid, budget),
                                                          grid.total, targets[index : index + 1], baseline,
                                                          desc=self.name, timings=timings, forward=forward):
                drops = np.stack([reference - scores[:, 0], np.ones_like(scores[:, 0])], axis=1)
                windows = (np.float32(1.0) - masks).reshape(masks.shape[0], shape[0] * height, width)
                sums += kernels.accumulate_scores(drops, windows)
            maps[index] = (sums[0] / sums[1]).reshape(shape).mean(axis=0)
        return Attribution(maps, logits, targets, method_timings(timings, started))


# --- RISE --------------------------------------------------------------------------------------


class Rise(Method):
    """RISE: target probability of randomly masked copies, weighted by the masks (Petsiuk et al. 2018)."""

    name = "rise"
    summary = "RISE: masks weighted by the target probability of the masked image (random, batched, flat memory)"
    options = (
        Option("n_masks", Integer(1), 500, "number of random masks (500: seconds on a CPU; the paper's 4000 to "
                                           "8000 give smoother maps at 8 to 16 times the cost)"),
        Option("grid", Integer(1), 7, "cells per side of each mask's grid"),
        Option("p", Number(above=0, below=1), 0.5, "probability of keeping a cell"),
        Option("seed", Integer(0, 2**64 - 1), 0, "seed of the masks"),
        *BUDGET_OPTIONS,
    )

    def compute(self, request: AttributionRequest) -> Attribution:
        started, timings = time.perf_counter(), {}
        n_masks, grid, p, seed = (request.options[name] for name in ("n_masks", "grid", "p", "seed"))
        height, width = request.images.shape[2:]
        logits, targets = reference_logits(request, timings)
        budget = perturbation_budget(request)
        maps = np.empty((request.images.shape[0], height, width), dtype=np.float32)
        for index in range(request.images.shape[0]):
            batches = (kernels.rise_masks(seed, first, min(budget, n_masks - first), grid, p, (height, width))
                       for first in range(0, n_masks, budget))
            saliency = np.zeros((1, height, width))  # float64 running sum of score-weighted masks
            for masks, scores in iter_perturbation_scores(request, index, batches, n_masks, targets[index : index + 1],
                                                          probabilities=True, desc=self.name, timings=timings):
                saliency += kernels.accumulate_scores(scores, masks)
            maps[index] = saliency[0] / (n_masks * p)
        return Attribution(maps, logits, targets, method_timings(timings, started))


PERTURBATION_METHODS: tuple[Method, ...] = (Occlusion(), Rise())
