"""Deletion and insertion curves and their AUC, as defined by RISE (Petsiuk et al., BMVC 2018, sec. 4.1).

Pixels are removed from (deletion) or inserted into (insertion) the image in the order of the
saliency map, most salient first, in ``steps`` equal parts; the curve is the softmax probability
of the explained class after each part, and its score the area under it by the trapezoidal rule
over the fraction of pixels changed (so in [0, 1]). Deletion replaces pixels with a baseline
(0 in model-input space, i.e. the normalisation mean); insertion starts from a blurred copy of
the image (RISE's Gaussian kernel: 11 x 11, sigma 5). Lower deletion and higher insertion are
better. All perturbed copies of all images go through the session in batches of ``batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from explainrt.errors import InvalidInputError, InvalidTargetError
from explainrt.numerics import softmax
from explainrt.optional import require
from explainrt.progress import track
from explainrt.validation import checked_int

BLUR_KERNEL_SIZE = 11
BLUR_SIGMA = 5.0
MODES = ("deletion", "insertion")


class ScoresModel(Protocol):
    """Anything with a plain forward pass: a ``Session`` (``explainer.session``) fits."""

    def logits(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class CausalCurves:
    """Probability curves [N, steps + 1] at ``fractions`` [steps + 1] of the pixels changed, and their AUC [N]."""

    mode: str
    fractions: np.ndarray
    scores: np.ndarray
    auc: np.ndarray


def trapezoid_auc(scores: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under each curve (last axis) over ``fractions`` spanning [0, 1], by the trapezoidal rule."""
    return np.trapezoid(np.asarray(scores, dtype=np.float64), np.asarray(fractions, dtype=np.float64), axis=-1)


def blur(images: np.ndarray) -> np.ndarray:
    """RISE's insertion start: each channel convolved with an 11 x 11 Gaussian (sigma 5), zero padding."""
    ndimage = require("scipy.ndimage", "the insertion metric's blurred start", "metrics")
    delta = np.zeros((BLUR_KERNEL_SIZE, BLUR_KERNEL_SIZE))
    delta[BLUR_KERNEL_SIZE // 2, BLUR_KERNEL_SIZE // 2] = 1.0
    kernel = ndimage.gaussian_filter(delta, BLUR_SIGMA)[None, None]
    return ndimage.correlate(images.astype(np.float64), kernel, mode="constant", cval=0.0).astype(np.float32)


def saliency_ranks(maps: np.ndarray) -> np.ndarray:
    """Per image, each pixel's position [N, H, W] in the order most salient first (ties: row-major order)."""
    flat = maps.reshape(maps.shape[0], -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None], axis=1)
    return ranks.reshape(maps.shape)


def check_maps(images: np.ndarray, maps: np.ndarray, targets: np.ndarray) -> None:
    """Reject maps and targets that do not match the image batch [N, C, H, W]."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise InvalidInputError(f"images must be a float batch [N, C, H, W] with N >= 1, got shape {images.shape}")
    if maps.shape != (images.shape[0], *images.shape[2:]):
        raise InvalidInputError(f"maps must have shape [N, H, W] = {(images.shape[0], *images.shape[2:])} "
                                f"to match the images, got {maps.shape}")
    if targets.shape != (images.shape[0],):
        raise InvalidInputError(f"targets must hold one class per image ({images.shape[0]}), got shape {targets.shape}")
    if (targets < 0).any():
        raise InvalidTargetError(f"targets must be class indices >= 0 (an Explanation's -1 marks a target that is no "
                                 f"class), got {targets.tolist()}")


def probabilities(model: ScoresModel, batches: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """Softmax probability of ``targets[i]`` for each image of each batch (targets aligned with the concatenation)."""
    scores = []
    for batch in batches:
        logits = np.asarray(model.logits(np.ascontiguousarray(batch)))
        if logits.ndim != 2:
            raise InvalidInputError(f"class probabilities need a classifier output [N, classes]; the model returns "
                                    f"{logits.shape}")
        scores.append(softmax(logits))
    stacked = np.concatenate(scores)
    beyond = sorted(set(targets[targets >= stacked.shape[1]].tolist()))
    if beyond:
        raise InvalidTargetError(f"targets {beyond} name classes beyond the model's {stacked.shape[1]}")
    return stacked[np.arange(targets.shape[0]), targets]


def causal_curves(model: ScoresModel, images: np.ndarray, maps: np.ndarray, targets: np.ndarray, mode: str,
                  steps: int = 100, baseline: float = 0.0, batch_size: int = 32,
                  progress: bool = False) -> CausalCurves:
    """RISE's deletion or insertion curves of ``maps`` [N, H, W] for ``images`` [N, C, H, W] (model input).

    ``targets`` [N] are the explained classes. Step k has changed the round(k / steps * H * W)
    most salient pixels, so every image runs ``steps + 1`` forward passes, ``batch_size`` at a time.
    """
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
    checked_int("steps", steps)
    checked_int("batch_size", batch_size)
    images = np.asarray(images, dtype=np.float32)
    maps = np.asarray(maps, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    check_maps(images, maps, targets)
    count, pixels = images.shape[0], maps.shape[1] * maps.shape[2]
    fractions = np.arange(steps + 1) / steps
    changed = np.rint(fractions * pixels).astype(np.int64)
    ranks = saliency_ranks(maps)
    changed_image = np.full_like(images, baseline) if mode == "deletion" else images
    start = images if mode == "deletion" else blur(images)

    pairs = [(image, step) for image in range(count) for step in range(steps + 1)]
    scores = np.empty(len(pairs))
    for first in track(range(0, len(pairs), batch_size), mode, unit="batches", enabled=progress, leave=False):
        chunk = pairs[first : first + batch_size]
        which = np.array([image for image, _ in chunk])
        replaced = ranks[which] < changed[[step for _, step in chunk]][:, None, None]
        batch = np.where(replaced[:, None], changed_image[which], start[which])
        scores[first : first + len(chunk)] = probabilities(model, [batch], targets[which])
    curves = scores.reshape(count, steps + 1)
    return CausalCurves(mode, fractions, curves, trapezoid_auc(curves, fractions))
