"""Input-gradient methods: Saliency, Integrated Gradients and SmoothGrad.

All three differentiate the target's logit with respect to the model input
(``session.input_gradients``), evaluated at many points per image for IG and SmoothGrad; the
points of all images of a chunk share runtime calls of at most ``request.batch_size`` inputs.

- Saliency (Simonyan et al., 2014): map = max over channels of |dy_c/dx| (``abs=False``: the
  signed sum over channels); ``multiply_by_input`` uses dy_c/dx * x (gradient x input).
- Integrated Gradients (Sundararajan et al., 2017, Eq. 1): (x - x') * int_0^1 dy_c/dx(x' + a(x - x')) da,
  with the quadrature rules and step sizes of Captum (``riemann_trapezoid`` follows Captum's
  weights 1/(2n), 1/n, ..., 1/n, 1/(2n)); map = sum over channels (signed). The completeness gap
  sum(attributions) - (y_c(x) - y_c(x')) is reported per image in ``extras["completeness_gap"]``.
- SmoothGrad (Smilkov et al., 2017): the gradient averaged over ``n_samples`` copies of the
  image with Gaussian noise of std ``noise * (max(x) - min(x))``; map = sum over channels of
  |mean gradient| (``squared=True``: sum over channels of the mean squared gradient).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from explainrt.errors import InvalidInputError
from explainrt.methods.base import Attribution, AttributionRequest, Method, gaussian_blur, resolve_targets, timed
from explainrt.methods.options import Array, Choice, Flag, Integer, Number, OneOf, Option
from explainrt.numerics import class_scores
from explainrt.progress import track

log = logging.getLogger(__name__)

RULES = ("riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre")
BLUR_SIGMA = 0.05
"""The "blur" baseline: a Gaussian blur of std BLUR_SIGMA * max(H, W) pixels (Sturmfels et al., 2020)."""


IMAGE_BASELINE = OneOf((Number(), Choice(("blur",)), Array("[C, H, W]", (3,))))
"""A reference image: a number (every pixel), "blur" (the image blurred) or an array [C, H, W]."""


def baselines(value: float | str | np.ndarray, images: np.ndarray) -> np.ndarray:
    """The baseline of each image [n, C, H, W] from an ``IMAGE_BASELINE`` value: a number, "blur" or [C, H, W]."""
    if isinstance(value, str):  # "blur"
        return gaussian_blur(images, BLUR_SIGMA * max(images.shape[2:]))
    if np.ndim(value) == 0:
        return np.full_like(images, float(value))
    if value.shape != images.shape[1:]:
        expected = f"[C, H, W] = [{', '.join(map(str, images.shape[1:]))}]"
        raise InvalidInputError(f"baseline must be a number, 'blur' or an array of shape {expected}, "
                                f"got shape {list(value.shape)}")
    return np.broadcast_to(value.astype(np.float32), images.shape).copy()


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points a in [0, 1] and weights of Captum's integral approximation ``rule`` (of RULES), ``steps`` points."""
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1), 0.5 * weights
    if rule == "riemann_trapezoid" and steps < 2:
        raise InvalidInputError(f"riemann_trapezoid needs steps >= 2, got {steps}")
    weights = np.full(steps, 1.0 / steps)
    if rule == "riemann_trapezoid":
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, steps), weights
    start = {"riemann_left": 0.0, "riemann_right": 1.0 / steps, "riemann_middle": 0.5 / steps}[rule]
    return start + np.arange(steps) / steps, weights


def weighted_gradients(request: AttributionRequest, targets: np.ndarray, count: int,
                       inputs_at: Callable[[np.ndarray, np.ndarray], np.ndarray], weights: np.ndarray,
                       timings: dict[str, float], squared: bool = False) -> np.ndarray:
    """Per image i: sum_j weights[j] * g(inputs_at(i, j)) (g² when ``squared``), g = dy_t/dx, [n, C, H, W].

    The n * count points are visited image by image, point by point, in runtime calls of at most
    ``request.batch_size`` inputs; ``inputs_at(images, points)`` builds one call's inputs.
    """
    n = request.images.shape[0]
    total = np.zeros(request.images.shape, dtype=np.float64)
    starts = range(0, n * count, request.batch_size)
    for start in track(starts, "input gradients", unit="batches", enabled=request.progress and len(starts) > 1,
                       leave=False):
        request.check_cancelled()
        image_of, point_of = np.divmod(np.arange(start, min(start + request.batch_size, n * count)), count)
        batch = np.ascontiguousarray(inputs_at(image_of, point_of), dtype=np.float32)
        with timed(timings, "runtime"):
            gradients = request.session.input_gradients(batch, targets[image_of, None]).gradients[0][:, 0]
        if squared:
            gradients = gradients * gradients
        for image in np.unique(image_of):
            rows = image_of == image
            total[image] += np.tensordot(weights[point_of[rows]], gradients[rows], axes=1)
    return total


def _logits(request: AttributionRequest, images: np.ndarray, timings: dict[str, float]) -> np.ndarray:
    """Plain logits of any number of images, in runtime calls of at most ``request.batch_size``."""
    parts = []
    with timed(timings, "runtime"):
        for start in range(0, images.shape[0], request.batch_size):
            request.check_cancelled()
            parts.append(request.session.logits(np.ascontiguousarray(images[start:start + request.batch_size])))
    return np.concatenate(parts)


class Saliency(Method):
    """Simonyan et al.'s saliency map: the largest |dy_c/dx| over the colour channels of each pixel."""

    name = "saliency"
    summary = "Saliency (Simonyan et al.): max over channels of |d logit / d input|"
    options = (
        Option("abs", Flag(), True, "max over channels of |gradient| (False: the signed sum over channels)"),
        Option("multiply_by_input", Flag(), False, "gradient x input instead of the gradient"),
    )

    many_targets = True

    def compute(self, request: AttributionRequest) -> Attribution:
        """Maps of the request's targets ([n], or [n, K]: one runtime call for all K, maps [n, K, H, W])."""
        absolute, by_input = request.options["abs"], request.options["multiply_by_input"]
        many = request.targets.ndim == 2
        timings: dict[str, float] = {}
        with timed(timings, "runtime"):
            result = request.session.input_gradients(request.images, request.targets if many else request.targets[:, None])
        gradients = result.gradients[0]  # [n, K, C, H, W]
        if by_input:
            gradients = gradients * request.images[:, None]
        maps = np.abs(gradients).max(axis=2) if absolute else gradients.sum(axis=2)
        targets = np.asarray(result.targets)
        return Attribution(maps.astype(np.float32) if many else maps[:, 0].astype(np.float32), result.logits,
                           targets if many else targets[:, 0], timings)


class IntegratedGradients(Method):
    """Integrated Gradients from a baseline, with Captum's quadrature rules and a completeness check."""

    name = "integrated-gradients"
    summary = "Integrated Gradients (Sundararajan et al.): path integral of input gradients from a baseline"
    options = (
        Option("baseline", IMAGE_BASELINE, 0.0, "the reference input x' the path starts from"),
        Option("steps", Integer(1), 50, "points of the path integral (riemann_trapezoid: at least 2)"),
        Option("rule", Choice(RULES), "gausslegendre", "Captum's quadrature rule"),
    )
    signed = True

    def compute(self, request: AttributionRequest) -> Attribution:
        steps = request.options["steps"]
        alphas, weights = quadrature(request.options["rule"], steps)
        images = request.images
        base = baselines(request.options["baseline"], images)
        n, timings = images.shape[0], {}
        end_logits = _logits(request, np.concatenate([images, base]), timings)
        logits, base_logits = end_logits[:n], end_logits[n:]
        targets = resolve_targets(request.targets, logits)
        delta = images - base
        path = weighted_gradients(request, targets, steps, lambda i, j: base[i] + alphas[j, None, None, None] * delta[i],
                                  weights, timings)
        attributions = delta * path
        rows = np.arange(n)
        change = class_scores(logits)[rows, targets] - class_scores(base_logits)[rows, targets]
        gap = attributions.sum(axis=(1, 2, 3)) - change
        for image, value in enumerate(gap):
            log.info("integrated gradients, image %d: completeness gap %.3g (y(x) - y(baseline) = %.3g)",
                     image, value, change[image])
        return Attribution(attributions.sum(axis=1).astype(np.float32), logits, targets, timings,
                           {"completeness_gap": gap.astype(np.float32)})


class SmoothGrad(Method):
    """SmoothGrad: the input gradient averaged over noisy copies of the image."""

    name = "smoothgrad"
    summary = "SmoothGrad (Smilkov et al.): input gradients averaged over noisy copies of the image"
    options = (
        Option("n_samples", Integer(1), 25, "noisy copies per image"),
        Option("noise", Number(at_least=0), 0.15, "noise std as a fraction of the image's value range"),
        Option("seed", Integer(0), 0, "seed of the noise"),
        Option("squared", Flag(), False, "average the squared gradients (SmoothGrad-Squared)"),
    )

    def compute(self, request: AttributionRequest) -> Attribution:
        options = request.options
        samples, noise, seed, squared = options["n_samples"], options["noise"], options["seed"], options["squared"]
        images, timings = request.images, {}
        logits = _logits(request, images, timings)
        targets = resolve_targets(request.targets, logits)
        stds = noise * (images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3)))
        rng = np.random.default_rng(seed)

        def noisy(image_of: np.ndarray, _points: np.ndarray) -> np.ndarray:
            # one stream in point order: the same noise as one draw of [n, n_samples, C, H, W]
            draws = rng.standard_normal((len(image_of), *images.shape[1:]), dtype=np.float32)
            return images[image_of] + stds[image_of, None, None, None] * draws

        mean = weighted_gradients(request, targets, samples, noisy, np.full(samples, 1.0 / samples), timings, squared)
        maps = mean.sum(axis=1) if squared else np.abs(mean).sum(axis=1)
        return Attribution(maps.astype(np.float32), logits, targets, timings)


GRADIENT_METHODS: tuple[Method, ...] = (Saliency(), IntegratedGradients(), SmoothGrad())
