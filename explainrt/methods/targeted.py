"""Targeted explanations: "what if this region were absent", "why P rather than Q", and Galore.

- Counterfactual-CAM: Grad-CAM weights from the negated gradients, alpha_k = GAP(-dy_c/dA_k).
- Contrast-CAM (Prabhushankar et al., ICIP 2020): alpha_k = GAP(dJ/dA_k) for J = CE(logits, Q),
  the loss of a contrast class Q; the explained class P is the prediction.
- Galore (Wang & Vasconcelos: deliberative explanations, NeurIPS 2019; SCOUT, CVPR 2020), on
  attribution maps a = ReLU(sum_k A_k * dscore/dA_k) at the target layer, each divided by its
  maximum so products compare across classes:
  a_c for a class logit; a(s) for the confidence s = max softmax, from the positive part of
  ds/dA; d for the difficulty 1 - s, from the positive part of -ds/dA. explainrt has no trained
  difficulty predictor, so d comes from the confidence score's gradient (ds/dA = -s dCE/dA).
  Deliberative insecurity of classes (a, b) among the top 3: a_a * a_b * d (symmetric in the
  pair). Discriminant map D(x, y*, y_c) = a(s) * (1 - a_yc) * a_y* (a_yc scaled to max 1, so
  1 - a_yc is max a_yc - a_yc); with an example x_c of the counter class, also D(x_c, y_c, y*).
Maps are combined at the layer's resolution, averaged over target layers and resized.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from explainrt import kernels
from explainrt.errors import InvalidInputError
from explainrt.methods.base import (
    Attribution,
    AttributionRequest,
    Method,
    add_timings,
    resolve_targets,
    timed,
)
from explainrt.methods.cam import (
    CamMethod,
    cam_attribution,
    closed_form_terms,
    combine_layers,
    grad_cam_terms,
    head_maps,
)
from explainrt.methods.options import ClassIndex, Images, Integer, Option
from explainrt.numerics import softmax
from explainrt.runtime.base import RunResult
from explainrt.validation import check_class_range, checked_int

RUNNER_UP = -2
"""The class a contrast or counter class defaults to: the second most likely."""

TOP_PAIRS = ((0, 1), (0, 2), (1, 2))
"""The class pairs among the top 3 whose insecurity the deliberative explanation shows."""


def _classes(value: int | np.ndarray | None, name: str, count: int, classes: int) -> np.ndarray:
    """A validated class option (one int or one per image; None: RUNNER_UP) as int64 [count], in range."""
    values = np.broadcast_to(np.asarray(RUNNER_UP if value is None else value, dtype=np.int64), (count,))
    check_class_range(values, classes, name)
    return values


def _timed_run(request: AttributionRequest, timings: dict[str, float], images: np.ndarray, targets: np.ndarray,
               objective: str = "logit") -> RunResult:
    with timed(timings, "runtime"):
        return request.session.run(images, targets, objective)


class ContrastCam(Method):
    """Contrast-CAM: why the prediction P rather than a contrast class Q (or each of the next top_k)."""

    name = "contrast-cam"
    class_targets_only = True
    summary = "Contrast-CAM: why P rather than Q (gradient of the cross-entropy of contrast class Q)"
    options = (
        Option("contrast", ClassIndex(), None,
               f"the contrast class Q, or one per image (None: {RUNNER_UP}, the runner-up)", per_image=True),
        Option("top_k", Integer(1), None, "contrast with each of the next k classes instead (maps in extras)"),
    )

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The checked options; contrast and top_k exclude each other."""
        checked = super().check_options(options)
        if checked["top_k"] is not None and checked["contrast"] is not None:
            raise InvalidInputError("method 'contrast-cam': give contrast (the class Q per image) or top_k "
                                    "(the next k classes), not both")
        return checked

    def compute(self, request: AttributionRequest) -> Attribution:
        n, classes = request.images.shape[0], request.session.spec.num_classes
        top_k = request.options["top_k"]
        if top_k is not None:
            contrasts = np.tile(-np.arange(2, checked_int("top_k", top_k, 1, classes - 1) + 2, dtype=np.int64), (n, 1))
        else:
            contrasts = _classes(request.options["contrast"], "contrast", n, classes)[:, None]
        timings: dict[str, float] = {}
        head = head_maps(request, self.name, contrasts, timings)
        result = head if head is not None else _timed_run(request, timings, request.images, contrasts, "cross_entropy")
        predicted = result.logits.argmax(axis=1)
        explained = resolve_targets(request.targets, result.logits)
        if (explained != predicted).any():
            image = int(np.argmax(explained != predicted))
            raise InvalidInputError(f"contrast-cam explains the predicted class: image {image} is predicted as "
                                    f"{predicted[image]}, not the requested target {explained[image]}")
        same = result.targets == predicted[:, None]
        if same.any():
            image = int(np.argwhere(same)[0][0])
            raise InvalidInputError(f"the contrast class of image {image} is its predicted class {predicted[image]}: "
                                    "choose another class Q")
        if head is not None:
            maps = head.maps
        else:
            per_contrast = [cam_attribution(request, result, predicted, grad_cam_terms, seed=k)
                            for k in range(contrasts.shape[1])]
            add_timings(timings, *per_contrast)
            maps = np.stack([p.maps for p in per_contrast], axis=1)
            if request.normalize:  # every contrast's map scaled as the pipeline scales the first (and a map head all)
                with timed(timings, "maps"):
                    maps = kernels.normalize_minmax(maps.reshape(-1, *maps.shape[2:])).reshape(maps.shape)
        extras = {"contrast_classes": result.targets}
        if top_k is not None:
            extras["contrast_maps"] = maps
        return Attribution(maps[:, 0], result.logits, predicted, timings, extras, normalized=request.normalize)


def attribution_maps(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Galore's attributions ReLU(sum_k A_k * g_k) per seed, divided by their maximum: [n, K, h, w]."""
    maps = np.maximum(np.einsum("nchw,nkchw->nkhw", activations, gradients), 0)
    peak = maps.max(axis=(2, 3), keepdims=True)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def confidence_attributions(result: RunResult) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (a(s), d): attributions of the confidence s and of the difficulty 1 - s, [n, h, w] each.

    ``result`` is a cross-entropy run for the top class: ds/dA = -s * dCE/dA.
    """
    confidence = softmax(result.logits).max(axis=1).astype(np.float32)
    pairs = []
    for acts, grads in zip(result.activations, result.gradients):
        d_confidence = -confidence[:, None, None, None, None] * grads
        positive = attribution_maps(acts, np.maximum(d_confidence, 0))[:, 0]
        negative = attribution_maps(acts, np.maximum(-d_confidence, 0))[:, 0]
        pairs.append((positive, negative))
    return pairs


def _resized(per_layer: list[np.ndarray], out_hw: tuple[int, int]) -> np.ndarray:
    """Average layer maps [n, ..., h, w] after resizing each to the input size: [n, ..., H, W]."""
    resized = []
    for maps in per_layer:
        flat = np.ascontiguousarray(maps.reshape(-1, *maps.shape[-2:]), dtype=np.float32)
        resized.append(kernels.resize_bilinear(flat, out_hw).reshape(*maps.shape[:-2], *out_hw))
    return combine_layers(resized)


class GaloreDeliberative(Method):
    """Where the model hesitates between two of its top 3 classes (deliberative insecurities)."""

    name = "galore-deliberative"
    class_targets_only = True
    summary = "Galore deliberative: insecurity a_a * a_b * d for class pairs among the top 3 (all pairs in extras)"

    def compute(self, request: AttributionRequest) -> Attribution:
        n, classes = request.images.shape[0], request.session.spec.num_classes
        if classes < 3:
            raise InvalidInputError(f"galore-deliberative needs at least 3 classes, the model has {classes}")
        timings: dict[str, float] = {}
        top = _timed_run(request, timings, request.images, np.tile(np.array([-1, -2, -3], dtype=np.int64), (n, 1)))
        confidence = _timed_run(request, timings, request.images, np.full((n, 1), -1, dtype=np.int64), "cross_entropy")
        with timed(timings, "method"):
            per_layer = []
            for acts, grads, (_, difficulty) in zip(top.activations, top.gradients, confidence_attributions(confidence)):
                by_class = attribution_maps(acts, grads)
                per_layer.append(np.stack([by_class[:, a] * by_class[:, b] * difficulty for a, b in TOP_PAIRS], axis=1))
            insecurities = _resized(per_layer, request.images.shape[2:])
            pairs = np.stack([top.targets[:, [a, b]] for a, b in TOP_PAIRS], axis=1)
        return Attribution(insecurities[:, 0], top.logits, top.targets[:, 0], timings,
                           {"insecurity_maps": insecurities, "insecurity_pairs": pairs})


class GaloreCounterfactual(Method):
    """Regions that tell the predicted class from a counter class (SCOUT discriminant maps)."""

    name = "galore-counterfactual"
    class_targets_only = True
    summary = "Galore counterfactual: discriminant map a(s) * (1 - a_counter) * a_class vs a counter class"
    options = (
        Option("counter_class", ClassIndex(), None, f"the counter class, or one per image (None: {RUNNER_UP}, the runner-up)",
               per_image=True),
        Option("counter_image", Images(), None, "an example of the counter class, or one per image: adds the "
               "reverse map D(x_c, y_c, y*) to extras", image=True),
    )

    def compute(self, request: AttributionRequest) -> Attribution:
        n, classes = request.images.shape[0], request.session.spec.num_classes
        counters = _classes(request.options["counter_class"], "counter_class", n, classes)
        timings: dict[str, float] = {}
        pair = _timed_run(request, timings, request.images, np.stack([request.targets, counters], axis=1))
        if (pair.targets[:, 0] == pair.targets[:, 1]).any():
            image = int(np.argmax(pair.targets[:, 0] == pair.targets[:, 1]))
            raise InvalidInputError(f"the counter class of image {image} is the explained class {pair.targets[image, 0]}: "
                                    "choose another counter_class")
        maps = self._discriminant(request, timings, request.images, pair)
        extras: dict[str, np.ndarray] = {"counter_classes": pair.targets[:, 1]}
        counter_image = request.options["counter_image"]
        if counter_image is not None:
            reverse = _timed_run(request, timings, counter_image, pair.targets[:, ::-1].copy())
            extras["counter_maps"] = self._discriminant(request, timings, counter_image, reverse)
        return Attribution(maps, pair.logits, pair.targets[:, 0], timings, extras)

    @staticmethod
    def _discriminant(request: AttributionRequest, timings: dict[str, float], images: np.ndarray,
                      pair: RunResult) -> np.ndarray:
        """D(x, y*, y_c) for the run's two seeds (explained class, counter class)."""
        top = np.full((images.shape[0], 1), -1, dtype=np.int64)
        confidence = _timed_run(request, timings, images, top, "cross_entropy")
        with timed(timings, "method"):
            per_layer = []
            for acts, grads, (aware, _) in zip(pair.activations, pair.gradients, confidence_attributions(confidence)):
                by_class = attribution_maps(acts, grads)
                per_layer.append(aware * (1 - by_class[:, 1]) * by_class[:, 0])
        return _resized(per_layer, images.shape[2:])


TARGETED_METHODS: tuple[Method, ...] = (
    CamMethod("counterfactual-cam", closed_form_terms("counterfactual-cam"),
              "Counterfactual-CAM: Grad-CAM of the negated gradients (what if this region were absent)",
              blank_reason="Counterfactual-CAM shows the regions whose removal would raise the class's score; for "
                           "the most likely class there is often none, so its map is all zero (explain another "
                           "class, e.g. targets=-2 or --target -2)"),
    ContrastCam(),
    GaloreDeliberative(),
    GaloreCounterfactual(),
)
