"""ROAD: RemOve And Debias (Rong et al., ICML 2022), MoRF and LeRF curves with noisy linear imputation.

Instead of a constant baseline (whose sharp edges leak the removed shape to the model), removed
pixels are filled by noisy linear imputation: each removed pixel is the weighted mean of its 8
neighbours (weight 1/6 for the 4 edge neighbours, 1/12 for the diagonals; out-of-image neighbours
dropped), solved jointly for all removed pixels as one sparse linear system per image, plus
Gaussian noise of standard deviation ``noise`` (0.01 in model-input units, as in the paper's code).

MoRF removes the given percentages of the most relevant pixels first (a fast drop of the class
probability is good), LeRF the least relevant first (a slow drop is good). Each image and
percentage is one imputation and one forward pass, batched through the model ``batch_size`` at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explainrt.errors import InvalidInputError
from explainrt.metrics.curves import ScoresModel, check_maps, probabilities, saliency_ranks
from explainrt.optional import require
from explainrt.progress import track
from explainrt.validation import checked_int

ORDERS = ("morf", "lerf")
DEFAULT_PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
DEFAULT_NOISE = 0.01
NEIGHBOUR_WEIGHTS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                     ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
"""(row offset, column offset), weight: the 8-neighbourhood of ROAD's linear imputation."""


@dataclass(frozen=True)
class RoadCurves:
    """Class probabilities [N, P] after removing ``percentages`` [P] of the pixels, and before [N]."""

    order: str
    percentages: np.ndarray
    scores: np.ndarray
    original: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """Per image, the probability averaged over the percentages (ROAD's summary score)."""
        return self.scores.mean(axis=1)


def noisy_linear_impute(image: np.ndarray, keep: np.ndarray, noise: float = DEFAULT_NOISE,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """``image`` [C, H, W] with the pixels where ``keep`` [H, W] is False linearly imputed, plus noise."""
    channels, height, width = image.shape
    keep_flat = np.asarray(keep, dtype=bool).reshape(-1)
    if keep_flat.size != height * width:
        raise InvalidInputError(f"keep must have shape [H, W] = {(height, width)}, got {np.shape(keep)}")
    if not keep_flat.any():
        raise InvalidInputError("ROAD cannot impute an image whose pixels are all removed (percentage 100)")
    missing = np.flatnonzero(~keep_flat)
    filled = image.reshape(channels, -1).astype(np.float32, copy=True)
    if missing.size == 0:
        return filled.reshape(image.shape)
    unknown_index = np.full(keep_flat.size, -1)
    unknown_index[missing] = np.arange(missing.size)
    rows, cols = np.divmod(missing, width)
    diagonal = np.ones(missing.size)
    rhs = np.zeros((missing.size, channels))
    pixels = image.reshape(channels, -1).astype(np.float64)
    entries: list[tuple[np.ndarray, np.ndarray, float]] = []
    for (row_offset, col_offset), weight in NEIGHBOUR_WEIGHTS:
        r, c = rows + row_offset, cols + col_offset
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        diagonal[~inside] -= weight
        equations = np.flatnonzero(inside)
        neighbours = r[inside] * width + c[inside]
        known = keep_flat[neighbours]
        np.subtract.at(rhs, equations[known], weight * pixels[:, neighbours[known]].T)
        entries.append((equations[~known], unknown_index[neighbours[~known]], weight))
    eq_rows = np.concatenate([e[0] for e in entries] + [np.arange(missing.size)])
    eq_cols = np.concatenate([e[1] for e in entries] + [np.arange(missing.size)])
    values = np.concatenate([np.full(e[0].size, e[2]) for e in entries] + [-diagonal])
    sparse = require("scipy.sparse", "ROAD's noisy linear imputation", "metrics")
    require("scipy.sparse.linalg", "ROAD's noisy linear imputation", "metrics")
    system = sparse.csc_matrix((values, (eq_rows, eq_cols)), shape=(missing.size, missing.size))
    solution = sparse.linalg.spsolve(system, rhs).reshape(missing.size, channels)
    if noise:
        solution = solution + noise * (rng or np.random.default_rng()).standard_normal(solution.shape)
    filled[:, missing] = solution.T
    return filled.reshape(image.shape)


def removed_pixels(saliency: np.ndarray, order: str, percentage: float) -> np.ndarray:
    """Bool [H, W]: the round(percentage % of H * W) most (MoRF) or least (LeRF) relevant pixels."""
    ranks = saliency_ranks(saliency[None])[0]
    count = int(np.rint(percentage / 100 * ranks.size))
    return ranks < count if order == "morf" else ranks >= ranks.size - count


def _check_road(order: str, percentages: Sequence[float], noise: float) -> np.ndarray:
    if order not in ORDERS:
        raise InvalidInputError(f"order must be one of {ORDERS}, got {order!r}")
    values = np.asarray(percentages, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not ((values > 0) & (values < 100)).all():
        raise InvalidInputError(f"percentages must be a non-empty list of numbers in (0, 100), got {percentages!r}")
    if not np.isfinite(noise) or noise < 0:
        raise InvalidInputError(f"noise must be a finite number >= 0, got {noise!r}")
    return values


def road_curves(model: ScoresModel, images: np.ndarray, maps: np.ndarray, targets: np.ndarray, order: str = "morf",
                percentages: Sequence[float] = DEFAULT_PERCENTAGES, noise: float = DEFAULT_NOISE, seed: int = 0,
                batch_size: int = 32, progress: bool = False) -> RoadCurves:
    """ROAD's MoRF or LeRF curves of ``maps`` [N, H, W] for ``images`` [N, C, H, W] (model input).

    The noise of image i, percentage j comes from ``numpy.random.default_rng([seed, i, j])``, so
    a run is reproducible and does not depend on ``batch_size``.
    """
    values = _check_road(order, percentages, noise)
    checked_int("batch_size", batch_size)
    images = np.asarray(images, dtype=np.float32)
    maps = np.asarray(maps, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    check_maps(images, maps, targets)
    pairs = [(image, index) for image in range(images.shape[0]) for index in range(values.size)]
    scores = np.empty(len(pairs))
    for first in track(range(0, len(pairs), batch_size), f"ROAD {order}", unit="batches", enabled=progress,
                       leave=False):
        chunk = pairs[first : first + batch_size]
        batch = np.stack([noisy_linear_impute(images[i], ~removed_pixels(maps[i], order, values[j]), noise,
                                              np.random.default_rng([seed, i, j])) for i, j in chunk])
        scores[first : first + len(chunk)] = probabilities(model, [batch], targets[[i for i, _ in chunk]])
    original = probabilities(model, [images[s : s + batch_size] for s in range(0, images.shape[0], batch_size)], targets)
    return RoadCurves(order, values, scores.reshape(images.shape[0], values.size), original)
