"""Model -> explainable ONNX model: the graph rewriter and its VJP rules."""

from explainrt.export.explainable import make_explainable
from explainrt.export.spec import (
    RESOLVED_TARGETS_OUTPUT,
    TARGETS_INPUT,
    ExplainableSpec,
    activations_output,
    gradients_output,
    load_model,
)

__all__ = [
    "RESOLVED_TARGETS_OUTPUT",
    "TARGETS_INPUT",
    "ExplainableSpec",
    "activations_output",
    "gradients_output",
    "load_model",
    "make_explainable",
]
