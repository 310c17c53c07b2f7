"""Model -> explainable ONNX model: the graph rewriter and its VJP rules."""

from explainrt.export.explainable import (
    RESOLVED_TARGETS_OUTPUT,
    TARGETS_INPUT,
    ExplainableSpec,
    activations_output,
    gradients_output,
    load_model,
    make_explainable,
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
