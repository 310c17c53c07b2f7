"""Variants of an explainable model: the same original model made explainable for another
objective, w.r.t. the input (input gradients, FGVis's defended Relus), and the head sub-graph
after a target layer (ablation). Sessions build them on first use."""

from __future__ import annotations

from typing import Any

import onnx

from explainrt.autodiff.builder import GraphBuilder, sort_topologically
from explainrt.autodiff.gradients import ancestors
from explainrt.errors import InvalidInputError
from explainrt.export.explainable import make_explainable
from explainrt.export.inputs import input_form, with_nominal_size
from explainrt.export.layouts import Layout
from explainrt.export.spec import ExplainableSpec, original_model

HEAD_INPUT_PREFIX = "explainrt.head."


def variant_model(model: onnx.ModelProto, spec: ExplainableSpec, objective: str, of_input: bool,
                  defended: bool = False, size: tuple[int, int] | None = None, **options: Any) -> onnx.ModelProto:
    """The explainable model for an objective, w.r.t. the target layers or the input (FGVis's defence
    optional): ``model`` itself when it is that one (and keeps its activation and gradient outputs), else
    the original model made explainable again. ``size``: the image height and width to fix first (a model
    of dynamic size whose gradient down to the image needs static shapes, as a strided Conv's does).
    ``options``: more of ``make_explainable``'s (map heads, ``zero_branches``) for a variant made anew."""
    if (objective, of_input, defended) == (spec.objective, False, False) and not spec.maps_only and not options:
        return model
    form = input_form(model)
    if of_input and form.is_integer:
        raise InvalidInputError(f"gradients with respect to the image need a float image input; the model takes "
                                f"{form.describe()} pixels, which have none: use a CAM or perturbation method")
    layers = [spec.image_input] if of_input else list(spec.target_layers)
    stored = {} if of_input or not spec.layouts else {
        "layer_layout": [layout["kind"] for layout in spec.layouts],
        "token_grid": [tuple(layout["grid"]) if layout["kind"] == "tokens" else None for layout in spec.layouts],
        "prefix_tokens": [layout["prefix_tokens"] if layout["kind"] == "tokens" else None for layout in spec.layouts]}
    plain = original_model(model)
    if size is not None:
        plain = with_nominal_size(plain, size) or plain
    return make_explainable(plain, layers, logits=spec.logits, objective=objective, defended_relus=defended,
                            **stored, **options)


def variant_kind(of_input: bool, defended: bool) -> str:
    return ("defended " if defended else "") + ("input-gradient" if of_input else "layer")


def head_model(model: onnx.ModelProto, spec: ExplainableSpec, layer: int) -> tuple[onnx.ModelProto, bool]:
    """The sub-graph from one target layer to the logits, and whether it also reads the image.

    Exporters often compute reshape targets from ``Shape(image)``; such a head takes the image
    as a second input (only its shape is then read; whatever else it reads stays exact).
    """
    plain = original_model(model)
    tensor = spec.target_layers[layer]
    layout = Layout.from_json(spec.layouts[layer]) if spec.layouts else None
    if layout is None or layout.kind == "nchw":
        reads_image = spec.image_input in ancestors(plain.graph, spec.logits, stop=tensor)
        inputs = [tensor, spec.image_input] if reads_image else [tensor]
        return onnx.utils.Extractor(plain).extract_model(inputs, [spec.logits]), reads_image
    return _head_from_maps(plain, spec, layer, layout)


def head_input(spec: ExplainableSpec, layer: int) -> str:
    """The input of ``head_model(..., layer)`` that takes the layer's activations as [N, C, h, w]."""
    if not spec.layouts or spec.layouts[layer]["kind"] == "nchw":
        return spec.target_layers[layer]
    return f"{HEAD_INPUT_PREFIX}{layer}"


def _head_from_maps(plain: onnx.ModelProto, spec: ExplainableSpec, layer: int,
                    layout: Layout) -> tuple[onnx.ModelProto, bool]:
    """A head for a channels-last or token layer: it takes [N, C, h, w] and lays it out as the layer
    was. Prefix tokens (CLS, ...) are not in the maps: they are computed from the image by the model
    itself and kept, so the head runs the whole model with the layer's grid part replaced."""
    tensor = spec.target_layers[layer]
    b = GraphBuilder(plain)
    b.scope = f"explainrt/head/{layer}"
    source = b.add_input(head_input(spec, layer), b.info(tensor).elem_type, ["N", layout.channels, *layout.grid])
    channels_last = b.op("Transpose", [source], perm=[0, 2, 3, 1])
    if layout.kind == "nhwc":
        replaced = channels_last
    else:
        tokens = b.op("Reshape", [channels_last, b.ints([0, layout.grid[0] * layout.grid[1], layout.channels])])
        if layout.prefix_tokens:
            prefix = b.op("Slice", [tensor, b.ints([0]), b.ints([layout.prefix_tokens]), b.ints([1])])
            tokens = b.op("Concat", [prefix, tokens], axis=1)
        replaced = tokens
    for node in plain.graph.node:
        if node.name.startswith(b.scope):
            continue
        for index, value in enumerate(node.input):
            if value == tensor:
                node.input[index] = replaced
    nodes = sort_topologically(plain.graph.node)
    del plain.graph.node[:]
    plain.graph.node.extend(nodes)
    reads_image = layout.prefix_tokens > 0 or spec.image_input in ancestors(plain.graph, spec.logits, stop=replaced)
    inputs = [head_input(spec, layer)] + ([spec.image_input] if reads_image else [])
    return onnx.utils.Extractor(plain).extract_model(inputs, [spec.logits]), reads_image
