"""Target layers: the tensors a user names, checked, or the one chosen automatically.

The automatic choice never takes a tensor whose axis 0 is not the image batch, an
attention-internal tensor, or a pooled ``1 x 1`` map. In a transformer (a graph with attention)
it takes the last block's first normalisation, as pytorch-grad-cam's tutorials do: the last
LayerNormalization output that feeds an attention; elsewhere the last sound feature map on the
path to the logits. When nothing sound exists, the error lists the closest candidates.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import onnx

from explainrt.autodiff.builder import Dim, GraphBuilder
from explainrt.autodiff.gradients import ancestors
from explainrt.errors import NoSpatialLayerError, UnknownLayerError
from explainrt.export.axes import Labels, axis_labels
from explainrt.export.layouts import Layout, LayoutRequest, layout_of


def target_layers(b: GraphBuilder, image: str, requested: str | Sequence[str], logits: str,
                  requests: Sequence[LayoutRequest] | None = None) -> list[tuple[str, Layout]]:
    """(tensor name, layout) per target layer: those ``requested`` by name, or ``"auto"``."""
    image_shape = b.info(image).shape or (None, None, None, None)
    size, batch = (image_shape[2], image_shape[3]), image_shape[0]
    labels = axis_labels(b.graph, b.infos, image)
    if isinstance(requested, str) and requested == "auto":
        request = (requests or [LayoutRequest()])[0]
        if request != LayoutRequest():
            name, _ = _automatic(b, logits, size, batch, labels)
            return [(name, layout_of(b.graph, name, b.info(name), size, batch, request, labels))]
        return [_automatic(b, logits, size, batch, labels)]
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names:
        raise UnknownLayerError("target_layers is empty: give tensor names or 'auto'")
    requests = list(requests or [LayoutRequest()] * len(names))
    chosen = []
    for name, request in zip(names, requests, strict=True):
        if name not in b.infos:
            hint = suggest(name, b.infos) or _feature_maps_hint(b, logits)
            raise UnknownLayerError(f"target layer {name!r} is not a tensor of the model{hint}")
        chosen.append((name, layout_of(b.graph, name, b.info(name), size, batch, request, labels)))
    return chosen


def _automatic(b: GraphBuilder, logits: str, size: tuple[Dim, Dim], batch: Dim,
               labels: Mapping[str, Labels]) -> tuple[str, Layout]:
    graph = b.graph
    upstream = ancestors(graph, logits)
    internal = _attention_internals(graph)
    sound: list[tuple[str, Layout]] = []
    rejected: list[str] = []
    for node in graph.node:
        for name in node.output:
            info = b.infos.get(name)
            if name not in upstream or info is None or info.rank not in (3, 4) or not info.is_float:
                continue
            if name in internal:
                rejected.append(f"{name!r} {list(info.shape or ())} (inside an attention)")
                continue
            try:
                layout = layout_of(graph, name, info, size, batch, LayoutRequest(), labels)
            except UnknownLayerError as error:
                why = " (grid axes not the image's rows and columns)" if "not the image's rows" in str(error) else ""
                rejected.append(f"{name!r} {list(info.shape or ())}{why}")
                continue
            if layout.grid[0] * layout.grid[1] <= 1:
                rejected.append(f"{name!r} {list(info.shape or ())} (a pooled 1 x 1 map)")
                continue
            sound.append((name, layout))
    attention_inputs = _feeding_attention(graph, [name for name, _ in sound], upstream)
    normalised = [(name, layout) for name, layout in sound
                  if name in attention_inputs and _producer(graph, name) == "LayerNormalization"]
    if normalised or sound:
        return (normalised or sound)[-1]
    listed = "; ".join(rejected[-5:]) or "none"
    raise NoSpatialLayerError(f"no rank-4 tensor with spatial size > 1 and no token layer leads to {logits!r} as a "
                              "sound target layer (image batch on axis 0, a grid that scales like the image, not "
                              f"inside an attention); the last tensors looked at: {listed}. Give target_layers "
                              "(and layer_layout where needed)")


def _producer(graph: onnx.GraphProto, name: str) -> str | None:
    return next((node.op_type for node in graph.node if name in node.output), None)


def _attention_internals(graph: onnx.GraphProto) -> set[str]:
    """Tensors between an attention's query/key product and its output: inputs and outputs of MatMuls
    of two activations (Q K^T, softmax(.) V), and what lies between them."""
    constants = {t.name for t in graph.initializer}
    for node in graph.node:  # constant folding: what only constants feed is a constant
        if all(i in constants for i in node.input if i):
            constants.update(node.output)
    products = [n for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
    internal = {value for node in products for value in (*node.input, *node.output)}
    softmaxes = {o for n in graph.node if n.op_type == "Softmax" for o in n.output}
    return internal | softmaxes


def _feeding_attention(graph: onnx.GraphProto, names: Sequence[str], upstream: set[str]) -> set[str]:
    """Those of ``names`` from which an attention's Softmax (on the path to the output) is reached."""
    softmax_inputs = {n.input[0] for n in graph.node if n.op_type == "Softmax" and n.output[0] in upstream}
    if not softmax_inputs:
        return set()
    reaching = set()
    for softmax_input in softmax_inputs:
        reaching |= ancestors(graph, softmax_input)
    return {name for name in names if name in reaching}


def _feature_maps_hint(b: GraphBuilder, logits: str) -> str:
    """The last few rank-4 tensors on the path to the logits, as a hint for a target layer name that matched nothing."""
    upstream = ancestors(b.graph, logits)
    maps = [name for node in b.graph.node for name in node.output
            if name in upstream and (info := b.infos.get(name)) is not None and info.rank == 4]
    return f" (the last feature maps before the logits: {', '.join(map(repr, maps[-3:]))})" if maps else ""


def suggest(name: str, known: object) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)  # type: ignore[call-overload]
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
