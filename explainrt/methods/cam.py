"""The CAM family: each method says how to weight a target layer's activation channels.

A CAM method is one small function from a ``LayerContext`` (activations A [N, C, h, w],
gradients g = d objective / dA [N, C, h, w], and the session for methods that re-run the
model) to ``CamTerms``: the activations to weight and per-channel [N, C] or per-pixel
[N, C, h, w] weights. ``CamMethod.attribute`` is the one pipeline they share: one runtime call,
the weights, the fused kernel (weight, ReLU, normalise, resize) per target layer, the layer
average. Formulas follow the papers and pytorch-grad-cam's numerics so results compare directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from explainrt import kernels
from explainrt.errors import InvalidInputError
from explainrt.kernels import cam_weights
from explainrt.methods.base import Attribution, AttributionRequest, Method, add_timings, timed
from explainrt.methods.options import Array, Function, OneOf, Option
from explainrt.methods.perturbation import perturbation_scores
from explainrt.numerics import class_scores
from explainrt.runtime.base import MapHeadSession, MapsResult, RunResult, Session, to_host
from explainrt.runtime.objective import scoring_only


@dataclass(frozen=True)
class LayerContext:
    """What a method may use to weight one target layer of one batch."""

    activations: np.ndarray  # [N, C, h, w]
    gradients: np.ndarray  # [N, C, h, w]: d objective / d activations for the explained target
    logits: np.ndarray  # [N, classes]
    targets: np.ndarray  # [N] resolved class per image
    images: np.ndarray  # [N, 3, H, W] model input
    layer: int
    session: Session
    batch_size: int
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CamTerms:
    activations: np.ndarray
    weights: np.ndarray  # [N, C] per channel or [N, C, h, w] per pixel


def combine_layers(per_layer: list[np.ndarray]) -> np.ndarray:
    """Average the (ReLU'd) maps of several target layers, as pytorch-grad-cam does."""
    return per_layer[0] if len(per_layer) == 1 else np.maximum(np.stack(per_layer), 0).mean(axis=0)


def cam_attribution(request: AttributionRequest, result: RunResult, explained: np.ndarray,
                    weigh: Callable[[LayerContext], CamTerms], seed: int = 0) -> Attribution:
    """Maps from one runtime result: weigh each target layer (gradients of seed ``seed``), fuse, average."""
    height, width = request.images.shape[2:]
    timings: dict[str, float] = {}
    per_layer = []
    for layer, (acts, grads) in enumerate(zip(result.activations, result.gradients)):
        with timed(timings, "method"):
            terms = weigh(LayerContext(acts, grads[:, seed], result.logits, explained, request.images, layer,
                                       request.session, request.batch_size, request.options))
        with timed(timings, "maps"):
            # the kernels make their inputs contiguous float32 on the arrays' own device (NumPy or CuPy)
            per_layer.append(kernels.cam_maps(terms.activations, terms.weights, (height, width),
                                              normalize=request.normalize))
    return Attribution(combine_layers(per_layer), result.logits, explained, timings)


def head_maps(request: AttributionRequest, method: str, targets: np.ndarray,
              timings: dict[str, float]) -> MapsResult | None:
    """``method``'s maps from the session's in-graph map head, when the method has a closed form, the
    session runs map heads, the request allows them and wants normalised maps; else None (Python path)."""
    # hasattr is what isinstance of the runtime-checkable Protocol tests, at a tenth of its cost per call
    if not (request.map_heads and request.normalize and method in cam_weights.CLOSED_FORMS
            and hasattr(request.session, "maps")):
        return None
    with timed(timings, "runtime"):
        return cast(MapHeadSession, request.session).maps(request.images, targets, method)


@dataclass(frozen=True)
class CamMethod(Method):
    """A CAM method: channel weights from the gradients of the target's logit (or none)."""

    name: str
    weigh: Callable[[LayerContext], CamTerms]
    summary: str
    options: tuple[Option, ...] = ()
    blank_reason: str = ""
    target_free: bool = False
    many_targets: bool = True

    def compute(self, request: AttributionRequest) -> Attribution:
        """Maps of the request's targets ([n], or [n, K]: one runtime call for all K, maps [n, K, H, W])."""
        many = request.targets.ndim == 2
        wanted = request.targets if many else request.targets[:, None]
        timings: dict[str, float] = {}
        head = head_maps(request, self.name, wanted, timings)
        if head is not None:
            maps, explained = head.maps, head.targets
            attribution = Attribution(maps, head.logits, explained, timings, normalized=True)
        else:
            with timed(timings, "runtime"):
                result = request.session.run(request.images, wanted)
            columns = [cam_attribution(request, result, result.targets[:, k], self.weigh, seed=k)
                       for k in range(wanted.shape[1])]
            add_timings(timings, *columns)
            attribution = Attribution(np.stack([column.maps for column in columns], axis=1), result.logits,
                                      np.asarray(result.targets), timings)
        if not many:
            attribution.maps, attribution.targets = attribution.maps[:, 0], attribution.targets[:, 0]
        return attribution


def closed_form_terms(method: str) -> Callable[[LayerContext], CamTerms]:
    """The weighting of a closed-form method: its formula in ``kernels.cam_weights`` (the one map heads use) on NumPy."""
    formula = cam_weights.CLOSED_FORMS[method].formula

    def weigh(ctx: LayerContext) -> CamTerms:
        activations, weights = formula(cam_weights.NUMPY, ctx.activations, ctx.gradients)
        return CamTerms(activations, cam_weights.channel_weights(weights))

    weigh.__name__ = weigh.__qualname__ = f"closed_form_terms({method!r})"
    return weigh


grad_cam_terms = closed_form_terms("gradcam")
"""Grad-CAM's terms (also Contrast-CAM's, on the gradients of its loss)."""


def principal_projection(stack: np.ndarray) -> np.ndarray:
    """Per image, the projection of [C, h*w] (centred over positions) on its first right singular vector."""
    stack = np.nan_to_num(stack)
    projections = []
    for item in stack:
        rows = item.reshape(item.shape[0], -1).T
        rows = rows - rows.mean(axis=0)
        _, _, vt = np.linalg.svd(rows, full_matrices=True)
        projections.append((rows @ vt[0, :]).reshape(item.shape[1:]))
    return np.float32(projections)


def _projection_terms(stack: np.ndarray) -> CamTerms:
    projection = principal_projection(stack)[:, None]
    return CamTerms(projection, np.ones(projection.shape[:2], dtype=np.float32))


def _eigen_cam(ctx: LayerContext) -> CamTerms:
    # Muhammad & Yeasin 2020: first principal component of the activations
    return _projection_terms(ctx.activations)


def _eigen_grad_cam(ctx: LayerContext) -> CamTerms:
    # EigenCAM on gradient-weighted activations
    return _projection_terms(ctx.gradients * ctx.activations)


def _score_cam(ctx: LayerContext) -> CamTerms:
    """Wang et al. 2020: each upsampled, normalised channel masks the input; softmax of the scores."""
    n, channels = ctx.activations.shape[:2]
    height, width = ctx.images.shape[2:]
    request = AttributionRequest(ctx.images, ctx.targets, ctx.session, ctx.batch_size, False, ctx.options)
    scores = np.empty((n, channels), dtype=np.float32)
    for image in range(n):
        batches = (kernels.channel_masks(ctx.activations[image : image + 1, start : start + ctx.batch_size],
                                         (height, width))[0] for start in range(0, channels, ctx.batch_size))
        scores[image] = perturbation_scores(request, image, batches, channels, ctx.targets[image : image + 1],
                                            desc="scorecam")[:, 0]
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return CamTerms(ctx.activations, shifted / shifted.sum(axis=1, keepdims=True))


def ablation_values(activations: np.ndarray) -> np.ndarray:
    """Value an ablated channel takes, per image and channel: 0 after a ReLU, else far below the minimum."""
    lowest = activations.reshape(activations.shape[0], -1).min(axis=1)
    values = np.where(lowest == 0, 0.0, lowest - 1e7).astype(np.float32)
    return np.repeat(values[:, None], activations.shape[1], axis=1)


def _ablation_cam(ctx: LayerContext) -> CamTerms:
    """Desai & Ramaswamy 2020: weight = relative drop of the target score when the channel is ablated.

    Only the part of the model after the target layer is re-run, a batch of ablated copies at once.
    """
    a = ctx.activations
    n, channels = a.shape[:2]
    values = ctx.options["ablation_values"]
    if callable(values):  # f(activations [n, C, h, w]) -> [n, C]: per target layer and per batch of images
        values = values(a)
    values = ablation_values(a) if values is None else np.asarray(values, dtype=np.float32)
    if values.shape != (n, channels):
        raise InvalidInputError(f"ablation_values must have shape {(n, channels)}, got {values.shape}")
    original = class_scores(ctx.logits)[np.arange(n), ctx.targets]
    ablated = np.empty((n, channels), dtype=np.float32)
    for image in range(n):
        session, (target,) = scoring_only(ctx.session, ctx.targets[image : image + 1])
        for start in range(0, channels, ctx.batch_size):
            stop = min(start + ctx.batch_size, channels)
            copies = np.repeat(a[image : image + 1], stop - start, axis=0)
            copies[np.arange(stop - start), np.arange(start, stop)] = values[image, start:stop, None, None]
            logits = session.head(ctx.layer, copies, ctx.images[image : image + 1])
            ablated[image, start:stop] = class_scores(to_host(logits))[:, target]
    return CamTerms(a, (original[:, None] - ablated) / original[:, None])


ABLATION_VALUES = Option(
    "ablation_values", OneOf((Array("[n, C]", (2,)), Function("(activations [n, C, h, w]) -> [n, C]"))), None,
    "value of each ablated channel per image, or a function of each target layer's activations "
    "(None: 0 after a ReLU, else far below the layer's minimum)")

CAM_METHODS: tuple[CamMethod, ...] = (
    CamMethod("gradcam", grad_cam_terms, "Grad-CAM: channels weighted by mean gradient"),
    CamMethod("gradcam++", closed_form_terms("gradcam++"), "Grad-CAM++: positive gradients with pixel-wise alphas"),
    CamMethod("xgradcam", closed_form_terms("xgradcam"), "XGrad-CAM: activation-normalised gradient weights"),
    CamMethod("hirescam", closed_form_terms("hirescam"), "HiResCAM: element-wise gradient x activation"),
    CamMethod("layercam", closed_form_terms("layercam"), "LayerCAM: positive gradients x activation per location"),
    CamMethod("eigencam", _eigen_cam, "Eigen-CAM: first principal component of the activations", target_free=True),
    CamMethod("eigengradcam", _eigen_grad_cam, "EigenGrad-CAM: principal component of gradient x activation"),
    CamMethod("scorecam", _score_cam, "Score-CAM: softmax of scores of channel-masked inputs (batched)"),
    CamMethod("ablationcam", _ablation_cam, "Ablation-CAM: score drop with each channel ablated (head only)",
              (ABLATION_VALUES,)),
)
