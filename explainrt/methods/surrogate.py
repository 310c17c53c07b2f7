"""LIME and KernelSHAP for images: a linear surrogate of the model over superpixels.

Both split each image into superpixels (scikit-image SLIC or quickshift, a callable, or ready
labels), switch superpixels on and off (off: the superpixel's mean colour, as lime's
``hide_color=None``, or a constant in model-input units), score the target class on the
perturbed copies through the shared perturbation runner, and fit a weighted linear model of the
score on the on/off vectors. The raw map paints each superpixel with its weight (signed).

Extras, all regular numeric arrays with the images on the first axis (so chunks concatenate and
``numpy.savez`` stores them without pickling): ``segments`` [n, H, W] int32 superpixel labels
0..S-1; ``superpixel_weights`` [n, H, W] float32, each pixel holding its superpixel's weight
(every superpixel, also those ``num_features`` leaves out of the map; one superpixel's weight is
``superpixel_weights[i][segments[i] == s][0]``); ``top_superpixels`` [n, k] int64, padded with
-1; and per-image scalars [n] float32 (LIME: ``intercept``, ``r2``; KernelSHAP: ``base_value``,
``full_value``).

- LIME (Ribeiro et al. 2016; lime's ``LimeImageExplainer`` and ``LimeBase``): sample 0 is all on,
  the rest are uniform random on/off vectors (``RandomState(seed).randint(0, 2)``, exactly the
  lime package's draw); weights sqrt(exp(-d^2 / width^2)) of the cosine distance d to the all-on
  vector (lime_image does not scale d; lime_text multiplies it by 100); ridge regression with an
  intercept (alpha 1).
- KernelSHAP (Lundberg & Lee 2017, eq. 9; shap's ``KernelExplainer``): coalitions weighted by
  the Shapley kernel, subset sizes enumerated in full (with their complements) from the
  smallest while the budget allows, the rest sampled by size in complementary pairs; a weighted
  least-squares fit with phi_0 = f(all off) and sum(phi) = f(x) - f(all off) enforced exactly by
  eliminating the last superpixel, as shap does (its ``l1_reg=False``).
"""

from __future__ import annotations

import itertools
import math
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from explainrt import kernels
from explainrt.optional import require
from explainrt.errors import InvalidInputError
from explainrt.methods.base import Attribution, AttributionRequest, Method
from explainrt.methods.options import Array, Choice, Function, Integer, Number, OneOf, Option, Parameters, Rejected
from explainrt.methods.perturbation import (
    BUDGET_OPTIONS,
    method_timings,
    perturbation_budget,
    perturbation_scores,
    reference_logits,
)

SEGMENTATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "slic": {"n_segments": 50, "compactness": 10.0, "sigma": 1.0},
    "quickshift": {"kernel_size": 4, "max_dist": 200.0, "ratio": 0.2},  # lime's default segmentation
}
"""Parameters of each scikit-image segmentation, overridable through ``segments={"algorithm": ..., ...}``."""

TOP_SUPERPIXELS = 5
"""Superpixels listed in ``extras["top_superpixels"]`` when ``num_features`` is not given (lime's default)."""


# -- segmentation -----------------------------------------------------------------------------
def _display_image(image: np.ndarray) -> np.ndarray:
    """[C, H, W] model input as [H, W, 3] in [0, 1]: per-channel min-max undoes an affine normalisation."""
    hwc = np.moveaxis(image, 0, -1).astype(np.float64)
    low, high = hwc.min(axis=(0, 1)), hwc.max(axis=(0, 1))
    scaled = (hwc - low) / np.where(high > low, high - low, 1.0)
    return np.repeat(scaled, 3, axis=-1) if scaled.shape[-1] == 1 else scaled


def _skimage_segmenter(spec: str | dict[str, Any], seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """A function image [H, W, 3] in [0, 1] -> labels, from "slic" | "quickshift" | {"algorithm": ..., params}."""
    segmentation = require("skimage.segmentation", "superpixel segments (LIME, KernelSHAP)")

    params = dict(spec) if isinstance(spec, dict) else {"algorithm": spec}
    algorithm = params.pop("algorithm")
    params = {**SEGMENTATION_DEFAULTS[algorithm], **params}
    if algorithm == "slic":
        params.setdefault("start_label", 0)
        run = segmentation.slic
    else:
        params.setdefault("rng", seed)
        run = segmentation.quickshift

    def segment(image: np.ndarray) -> np.ndarray:
        try:
            return run(image, channel_axis=-1, **params)
        except TypeError as error:
            raise InvalidInputError(f"segments: bad parameters for {algorithm!r}: {error}") from error

    return segment


def _check_segmentation(params: dict[str, Any]) -> None:
    """Reject a segmentation dict whose "algorithm" is not one of SEGMENTATION_DEFAULTS."""
    if params.get("algorithm") not in SEGMENTATION_DEFAULTS:
        raise Rejected(f"unknown segmentation {params.get('algorithm')!r}")


SEGMENTS = OneOf((
    Choice(tuple(SEGMENTATION_DEFAULTS)),
    Parameters("a dict {\"algorithm\": name, **scikit-image parameters}", _check_segmentation),
    Array("[H, W] (shared) or [N, H, W] (one per image)", (2, 3), integer=True),
    Function("(image [H, W, 3] in [0, 1]) -> labels [H, W]"),
))
"""The ``segments`` option: a scikit-image segmentation (a name, or a dict with its parameters), labels or a function."""


def segment_images(images: np.ndarray, segments: Any, seed: int) -> np.ndarray:
    """Superpixel labels [n, H, W] int32 numbered 0..S-1 per image, from a ``SEGMENTS`` value (checked).

    ``segments``: "slic" | "quickshift" | {"algorithm": name, **scikit-image parameters} |
    a callable (image [H, W, 3] float in [0, 1] -> [H, W] int) | int labels [H, W] (shared) or
    [n, H, W] (one per image). Segmenters see the model input scaled per channel to [0, 1].
    """
    n, _, height, width = images.shape
    if isinstance(segments, (str, dict)) or callable(segments):
        segment = segments if callable(segments) else _skimage_segmenter(segments, seed)
        labels = [np.asarray(segment(_display_image(image))) for image in images]
    else:
        given = np.asarray(segments)
        if given.ndim == 3 and given.shape[0] != n:
            raise InvalidInputError(f"segments has {given.shape[0]} label maps for {n} images: give one [H, W] map, "
                                    f"one per image, or a segmentation name")
        labels = list(given) if given.ndim == 3 else [given] * n
    out = np.empty((n, height, width), dtype=np.int32)
    for index, label in enumerate(labels):
        if label.shape != (height, width) or label.dtype.kind not in "iu":
            raise InvalidInputError(f"segments for image {index} must be int labels of shape {(height, width)}, "
                                    f"got {label.dtype} {label.shape}")
        _, dense = np.unique(label, return_inverse=True)
        out[index] = dense.reshape(height, width)
        if out[index].max() < 1:
            raise InvalidInputError(f"segments: image {index} has a single segment; LIME and KernelSHAP need at "
                                    f"least 2 superpixels (change the segmentation or its parameters, or pass "
                                    f"labels with 2+ values)")
    return out


def superpixel_means(image: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """[C, H, W]: every pixel replaced by its superpixel's mean colour (lime's hide_color=None)."""
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count)
    means = np.stack([np.bincount(flat, weights=channel.ravel(), minlength=count) / sizes for channel in image])
    return means[:, labels].astype(np.float32)


# -- LIME -------------------------------------------------------------------------------------
def lime_samples(count: int, n_samples: int, seed: int) -> np.ndarray:
    """On/off vectors [n_samples, count] int: row 0 all on, the rest drawn as the lime package draws them."""
    data = np.random.RandomState(seed).randint(0, 2, n_samples * count).reshape(n_samples, count)
    data[0, :] = 1
    return data


def lime_kernel(samples: np.ndarray, kernel_width: float) -> np.ndarray:
    """sqrt(exp(-d^2 / width^2)) of the cosine distance d of each sample to the all-on vector (0 -> d = 1)."""
    on = samples.sum(axis=1)
    distance = 1.0 - np.sqrt(on / samples.shape[1])
    return np.sqrt(np.exp(-(distance**2) / kernel_width**2))


@dataclass(frozen=True)
class LinearFit:
    coefficients: np.ndarray  # [S]
    intercept: float
    r2: float  # weighted coefficient of determination on the samples (lime's ``score``)


def weighted_ridge(x: np.ndarray, y: np.ndarray, weights: np.ndarray, alpha: float) -> LinearFit:
    """Ridge regression with an intercept and sample weights (scikit-learn's Ridge, in closed form).

    Centre x and y by their weighted means, solve (Xc' W Xc + alpha I) b = Xc' W yc.
    """
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    total = weights.sum()
    x_mean, y_mean = weights @ x / total, weights @ y / total
    xc, yc = x - x_mean, y - y_mean
    weighted = xc * weights[:, None]
    coefficients = np.linalg.solve(weighted.T @ xc + alpha * np.eye(x.shape[1]), weighted.T @ yc)
    intercept = float(y_mean - x_mean @ coefficients)
    residual = weights @ (y - x @ coefficients - intercept) ** 2
    spread = weights @ yc**2
    return LinearFit(coefficients, intercept, float(1.0 - residual / spread) if spread > 0 else 1.0)


# -- KernelSHAP -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Coalitions:
    members: np.ndarray  # [m, S] float64 0/1: which superpixels are on
    weights: np.ndarray  # [m] Shapley-kernel weights, summing to 1


def shapley_coalitions(count: int, n_samples: int, rng: np.random.Generator) -> Coalitions:
    """KernelSHAP's coalitions (shap's KernelExplainer): enumerate small sizes, then sample by size in pairs.

    Size s (and its complement M - s) has total kernel weight proportional to (M-1) / (s (M-s));
    a size is enumerated in full while the remaining budget covers all its coalitions at that
    weight, the remaining sizes are drawn at random (a repeated draw adds to its weight) and
    their weights rescaled to the weight left. n_samples is capped at 2^M - 2.
    """
    budget = min(n_samples, 2**count - 2) if count <= 30 else n_samples
    sizes = math.ceil((count - 1) / 2)
    paired = (count - 1) // 2
    size_weight = np.array([(count - 1) / (s * (count - s)) for s in range(1, sizes + 1)])
    size_weight[:paired] *= 2
    size_weight /= size_weight.sum()
    members: list[np.ndarray] = []
    weights: list[float] = []
    left, remaining, full = budget, size_weight.copy(), 0
    for size in range(1, sizes + 1):
        subsets = math.comb(count, size) * (2 if size <= paired else 1)
        if left * remaining[size - 1] / subsets < 1.0 - 1e-8:
            break
        full += 1
        left -= subsets
        if remaining[size - 1] < 1.0:
            remaining /= 1.0 - remaining[size - 1]
        weight = size_weight[size - 1] / subsets
        for chosen in itertools.combinations(range(count), size):
            mask = np.zeros(count)
            mask[list(chosen)] = 1.0
            members.append(mask)
            weights.append(weight)
            if size <= paired:
                members.append(1.0 - mask)
                weights.append(weight)
    fixed = len(members)
    left = budget - fixed
    if full < sizes and left > 0:
        draw_weight = size_weight.copy()
        draw_weight[:paired] /= 2  # each draw of a paired size yields two coalitions
        draw_weight = draw_weight[full:] / draw_weight[full:].sum()
        seen: dict[bytes, int] = {}
        for offset in rng.choice(len(draw_weight), 4 * left, p=draw_weight):
            if left <= 0:
                break
            size = int(offset) + full + 1
            mask = np.zeros(count)
            mask[rng.permutation(count)[:size]] = 1.0
            key = mask.tobytes()
            if key in seen:
                weights[seen[key]] += 1.0
                if size <= paired:
                    weights[seen[key] + 1] += 1.0
                continue
            seen[key] = len(members)
            members.append(mask)
            weights.append(1.0)
            left -= 1
            if left > 0 and size <= paired:
                members.append(1.0 - mask)
                weights.append(1.0)
                left -= 1
        drawn = np.asarray(weights[fixed:])
        weights[fixed:] = list(drawn * size_weight[full:].sum() / drawn.sum())
    return Coalitions(np.asarray(members).reshape(-1, count), np.asarray(weights))


def shapley_regression(coalitions: Coalitions, values: np.ndarray, full_value: float, null_value: float) -> np.ndarray:
    """Shapley values [S] from coalition values: weighted least squares with sum(phi) = f(x) - f(off) exact.

    The last superpixel is eliminated (phi_S = delta - sum of the others), as shap's solver does.
    """
    z = coalitions.members
    delta = full_value - null_value
    target = values - null_value - z[:, -1] * delta
    x = z[:, :-1] - z[:, -1:]
    weighted = coalitions.weights[:, None] * x
    try:
        head = np.linalg.solve(x.T @ weighted, weighted.T @ target)
    except np.linalg.LinAlgError:
        root = np.sqrt(coalitions.weights)
        head = np.linalg.lstsq(root[:, None] * x, root * target, rcond=None)[0]
    return np.append(head, delta - head.sum())


# -- the methods ------------------------------------------------------------------------------
OUTPUTS = ("probability", "logit")

SURROGATE_OPTIONS = (
    Option("segments", SEGMENTS, "slic", "the superpixels", per_image=True),
    Option("seed", Integer(0, 2**32 - 1), 0, "seed of the sampled on/off vectors"),
    Option("baseline", OneOf((Choice(("mean",)), Number())), "mean", "what an off superpixel shows: its mean "
           "colour, or a number in model-input units"),
    Option("num_features", Integer(1), None, "paint only the k superpixels of largest |weight| (None: all; "
           f"top_superpixels lists {TOP_SUPERPIXELS})"),
    Option("output", Choice(OUTPUTS), "probability", "the score explained: softmax probability or logit"),
    *BUDGET_OPTIONS,
)
"""Options LIME and KernelSHAP share (each declares its own ``n_samples``)."""


def _mask_batches(labels: np.ndarray, samples: np.ndarray, budget: int):
    """[b, H, W] keep-masks of the on/off samples [m, S], ``budget`` at a time (never all at once)."""
    for start in range(0, samples.shape[0], budget):
        yield kernels.segment_masks(labels, samples[start : start + budget].astype(np.float32))


def _top_superpixels(weights: np.ndarray, k: int) -> np.ndarray:
    """The k superpixels with the largest positive weights, best first, padded with -1."""
    order = np.argsort(-weights, kind="stable")[:k]
    order = order[weights[order] > 0]
    return np.pad(order, (0, k - order.size), constant_values=-1)


@dataclass(frozen=True)
class SurrogateFit:
    """One image's surrogate: a weight per superpixel and the method's per-image scalars."""

    weights: np.ndarray  # [S]
    scalars: dict[str, float]


class SuperpixelSurrogate(Method):
    """What LIME and KernelSHAP share: segment, sample on/off vectors, score them, fit, paint the weights.

    Subclasses say which on/off vectors to score (``samples``) and how to fit them (``fit``).
    """

    signed = True

    @abstractmethod
    def samples(self, count: int, n_samples: int | None, seed: int) -> Any:
        """The sampling plan for ``count`` superpixels: [m, S] 0/1 on/off vectors, or an object holding them."""

    @abstractmethod
    def fit(self, plan: Any, scores: np.ndarray, options: dict[str, Any]) -> SurrogateFit:
        """The superpixel weights from the scores [m] of the plan's on/off vectors (``on_off(plan)``)."""

    def on_off(self, plan: Any) -> np.ndarray:
        """The on/off vectors [m, S] to score, in the order ``fit`` reads their scores."""
        return plan

    def compute(self, request: AttributionRequest) -> Attribution:
        options = request.options
        n_samples, seed, num_features, output, baseline = (
            options[name] for name in ("n_samples", "seed", "num_features", "output", "baseline"))
        tick = time.perf_counter()
        labels = segment_images(request.images, options["segments"], seed)
        timings = {"segmentation": time.perf_counter() - tick}
        tick = time.perf_counter()
        logits, targets = reference_logits(request, timings)
        budget = perturbation_budget(request)
        n, _, height, width = request.images.shape
        maps = np.empty((n, height, width), dtype=np.float32)
        weights = np.empty((n, height, width), dtype=np.float32)
        top = np.empty((n, num_features or TOP_SUPERPIXELS), dtype=np.int64)
        scalars: dict[str, list[float]] = {}
        for index in range(n):
            count = int(labels[index].max()) + 1
            plan = self.samples(count, n_samples, seed)
            on_off = self.on_off(plan)
            off = superpixel_means(request.images[index], labels[index], count) if baseline == "mean" else baseline
            scores = perturbation_scores(request, index, _mask_batches(labels[index], on_off, budget), len(on_off),
                                         targets[index : index + 1], off, probabilities=output == "probability",
                                         desc=self.name, timings=timings)[:, 0]
            result = self.fit(plan, scores.astype(np.float64), options)
            weights[index] = result.weights[labels[index]]
            top[index] = _top_superpixels(result.weights, top.shape[1])
            painted = result.weights
            if num_features is not None:  # lime's explanation size: the k largest |weights|
                painted = np.where(np.isin(np.arange(count), np.argsort(-np.abs(painted), kind="stable")[:num_features]),
                                   painted, 0.0)
            maps[index] = painted[labels[index]]
            for key, value in result.scalars.items():
                scalars.setdefault(key, []).append(value)
        timings = method_timings(timings, tick)
        extras = {"segments": labels, "superpixel_weights": weights, "top_superpixels": top,
                  **{key: np.asarray(values, dtype=np.float32) for key, values in scalars.items()}}
        return Attribution(maps, logits, targets, timings, extras)


class Lime(SuperpixelSurrogate):
    """LIME for images: kernel-weighted ridge regression of the target score on random superpixel on/off vectors."""

    name = "lime"
    summary = "LIME: weighted ridge regression of the score on random superpixel on/off samples (lime's definition)"
    options = (
        Option("n_samples", Integer(2), 1000, "perturbed samples per image (the first has every superpixel on)"),
        *SURROGATE_OPTIONS,
        Option("kernel_width", Number(above=0), 0.25, "width of the exponential kernel on the cosine distance"),
        Option("alpha", Number(at_least=0), 1.0, "ridge regularisation"),
    )

    def samples(self, count: int, n_samples: int | None, seed: int) -> np.ndarray:
        return lime_samples(count, n_samples, seed)

    def fit(self, plan: np.ndarray, scores: np.ndarray, options: dict[str, Any]) -> SurrogateFit:
        model = weighted_ridge(plan, scores, lime_kernel(plan, options["kernel_width"]), options["alpha"])
        return SurrogateFit(model.coefficients, {"intercept": model.intercept, "r2": model.r2})


class KernelShap(SuperpixelSurrogate):
    """KernelSHAP over superpixels: Shapley-kernel weighted least squares with exact efficiency."""

    name = "kernelshap"
    summary = "KernelSHAP: Shapley values of superpixels by Shapley-kernel regression (shap's KernelExplainer)"
    options = (Option("n_samples", Integer(2), None, "coalitions per image (None: shap's auto, 2 S + 2048 for "
                      "S superpixels)"), *SURROGATE_OPTIONS)

    def samples(self, count: int, n_samples: int | None, seed: int) -> Coalitions:
        return shapley_coalitions(count, n_samples or 2 * count + 2048, np.random.default_rng(seed))

    def on_off(self, plan: Coalitions) -> np.ndarray:
        """All off, all on, then the coalitions."""
        count = plan.members.shape[1]
        return np.concatenate([np.zeros((1, count)), np.ones((1, count)), plan.members])

    def fit(self, plan: Coalitions, scores: np.ndarray, options: dict[str, Any]) -> SurrogateFit:
        null_value, full_value = scores[0], scores[1]
        phi = shapley_regression(plan, scores[2:], full_value, null_value)
        return SurrogateFit(phi, {"base_value": null_value, "full_value": full_value})


SURROGATE_METHODS: tuple[Method, ...] = (Lime(), KernelShap())
