"""Closed-form CAM weights, written once for both places that evaluate them.

Each formula maps a target layer's activations A and gradients g (same rank; channels at axis
-3, positions at -2 and -1) to the activations to weight and the weights: per channel
``[..., C, 1, 1]`` or per position ``[..., C, h, w]``. It is written over ``CamAlgebra``, the few
operations it needs beyond ``+ - * /``, so the Python path evaluates it on NumPy (or CuPy)
arrays (``NUMPY``) and the export layer appends the very same formula to an ONNX graph as a
map head (over ``explainrt.autodiff.gradients.V`` handles). Formulas follow the papers and
pytorch-grad-cam's numerics (its epsilons included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from explainrt.kernels._numpy import CAM_EPS

__all__ = ["CAM_EPS", "CLOSED_FORMS", "NO_CLOSED_FORM", "NUMPY", "CamAlgebra", "ClosedForm", "channel_weights"]


class CamAlgebra(Protocol):
    """What a weight formula may use besides the arithmetic operators of its arrays."""

    def mean_hw(self, x: Any) -> Any:
        """Mean over the two position axes, kept as size 1."""

    def sum_hw(self, x: Any) -> Any:
        """Sum over the two position axes, kept as size 1."""

    def relu(self, x: Any) -> Any:
        """max(x, 0) element-wise."""

    def where_nonzero(self, test: Any, x: Any) -> Any:
        """``x`` where ``test`` != 0, else 0."""


class _NumPyAlgebra:
    """``CamAlgebra`` on NumPy arrays (CuPy arrays dispatch through the same NumPy calls)."""

    def mean_hw(self, x: Any) -> Any:
        return x.mean(axis=(-2, -1), keepdims=True)

    def sum_hw(self, x: Any) -> Any:
        return x.sum(axis=(-2, -1), keepdims=True)

    def relu(self, x: Any) -> Any:
        return np.maximum(x, 0)

    def where_nonzero(self, test: Any, x: Any) -> Any:
        return np.where(test != 0, x, 0)


NUMPY: CamAlgebra = _NumPyAlgebra()

Formula = Callable[[CamAlgebra, Any, Any], tuple[Any, Any]]


def grad_cam(ops: CamAlgebra, a: Any, g: Any) -> tuple[Any, Any]:
    """Selvaraju et al. 2017, eq. 1: alpha_k = mean_ij dy/dA_kij (also Contrast-CAM's, on its loss's gradients)."""
    return a, ops.mean_hw(g)


def grad_cam_pp(ops: CamAlgebra, a: Any, g: Any) -> tuple[Any, Any]:
    """Chattopadhyay et al. 2018, eq. 19 (exponential output): alpha = g^2 / (2 g^2 + sum(A) g^3)."""
    g2 = g * g
    g3 = g2 * g
    alpha = ops.where_nonzero(g, g2 / (2 * g2 + ops.sum_hw(a) * g3 + 1e-6))
    return a, ops.sum_hw(ops.relu(g) * alpha)


def xgrad_cam(ops: CamAlgebra, a: Any, g: Any) -> tuple[Any, Any]:
    """Fu et al. 2020, eq. 9: alpha_k = sum_ij (A_kij / sum A_k) dy/dA_kij."""
    return a, ops.sum_hw(g * a / (ops.sum_hw(a) + 1e-7))


def hires_cam(ops: CamAlgebra, a: Any, g: Any) -> tuple[Any, Any]:
    """Draelos & Carin 2020: element-wise g * A, summed over channels."""
    return a, g


def layer_cam(ops: CamAlgebra, a: Any, g: Any) -> tuple[Any, Any]:
    """Jiang et al. 2021, eq. 4: ReLU(g) * A per location."""
    return a, ops.relu(g)


def counterfactual_cam(ops: CamAlgebra, a: Any, g: Any) -> tuple[Any, Any]:
    """Grad-CAM of the negated gradients: alpha_k = GAP(-dy/dA_k)."""
    return a, -ops.mean_hw(g)


@dataclass(frozen=True)
class ClosedForm:
    """A method whose map is a closed-form function of one explaining run: its formula and the
    objective (``explainrt.export.spec.OBJECTIVES``) whose gradients it weighs."""

    formula: Formula
    objective: str = "logit"


CLOSED_FORMS: dict[str, ClosedForm] = {
    "gradcam": ClosedForm(grad_cam),
    "gradcam++": ClosedForm(grad_cam_pp),
    "xgradcam": ClosedForm(xgrad_cam),
    "hirescam": ClosedForm(hires_cam),
    "layercam": ClosedForm(layer_cam),
    "counterfactual-cam": ClosedForm(counterfactual_cam),
    "contrast-cam": ClosedForm(grad_cam, "cross_entropy"),
}
"""The methods a map head can compute in the graph, by method name."""

NO_CLOSED_FORM: dict[str, str] = {
    "eigencam": "its map is the first singular vector of the activations, and ONNX has no SVD operator "
                "(power iteration converges at the eigen-gap's pace and leaves the sign open, so it would not "
                "reproduce the Python path's map)",
    "eigengradcam": "its map is the first singular vector of gradient x activation, and ONNX has no SVD operator",
    "scorecam": "its weights are the scores of one model run per channel-masked input",
    "ablationcam": "its weights are the score drops of one head run per ablated channel",
}
"""CAM-family methods that have no map head, and why."""


def channel_weights(weights: Any) -> Any:
    """Per-channel weights ``[..., C, 1, 1]`` as ``[..., C]`` (what ``kernels.cam_maps`` takes); others unchanged."""
    return weights[..., 0, 0] if weights.shape[-2:] == (1, 1) else weights
