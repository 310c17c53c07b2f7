"""Variants of an explainable model: the same original model made explainable for another
objective, w.r.t. the input (input gradients, FGVis's defended Relus), and the head sub-graph
after a target layer (ablation). Sessions build them on first use."""

from __future__ import annotations

import onnx

from explainrt.export.explainable import make_explainable
from explainrt.export.gradients import ancestors
from explainrt.export.spec import ExplainableSpec, original_model


def variant_model(model: onnx.ModelProto, spec: ExplainableSpec, objective: str, of_input: bool,
                  defended: bool = False) -> onnx.ModelProto:
    """The explainable model for an objective, w.r.t. the target layers or the input (FGVis's defence
    optional): ``model`` itself when it is that one, else the original model made explainable again."""
    if (objective, of_input, defended) == (spec.objective, False, False):
        return model
    layers = [spec.image_input] if of_input else list(spec.target_layers)
    return make_explainable(original_model(model), layers, logits=spec.logits, objective=objective,
                            defended_relus=defended)


def variant_kind(of_input: bool, defended: bool) -> str:
    return ("defended " if defended else "") + ("input-gradient" if of_input else "layer")


def head_model(model: onnx.ModelProto, spec: ExplainableSpec, layer: int) -> tuple[onnx.ModelProto, bool]:
    """The sub-graph from one target layer to the logits, and whether it also reads the image.

    Exporters often compute reshape targets from ``Shape(image)``; such a head takes the image
    as a second input (only its shape is then read; whatever else it reads stays exact).
    """
    plain = original_model(model)
    tensor = spec.target_layers[layer]
    reads_image = spec.image_input in ancestors(plain.graph, spec.logits, stop=tensor)
    inputs = [tensor, spec.image_input] if reads_image else [tensor]
    return onnx.utils.Extractor(plain).extract_model(inputs, [spec.logits]), reads_image
