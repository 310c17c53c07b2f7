"""Shapes of forward tensors as the reverse pass reads them: from the image's batch and constants, not Shape nodes."""

from __future__ import annotations

import numpy as np
import onnx

from explainrt.autodiff.builder import GraphBuilder, sort_topologically, tensor_infos
from explainrt.autodiff.gradients import GRADIENT_SEEDS


def shapes_from_the_image(model: onnx.ModelProto, image: str) -> int:
    """Replace each Shape node explainrt added (in the graph and in its If branches) that reads a forward tensor whose
    shape is static but for the image's batch by that batch (read from the image input) joined to constants, or by a
    constant where it is all static; in place, returns how many. The shapes are inferred anew from the graph (a
    recorded size may be stale). ONNX Runtime holds convolution outputs in a blocked layout
    (NCHWc) and converts one back for any reader outside it, a Shape too, even in an If branch that does not run:
    on YOLOv8n's box objective 14 such conversions served shapes alone."""
    forward = {o for n in model.graph.node if not n.name.startswith("explainrt/") for o in n.output} - {image}
    shapes = [n for g in _graphs(model.graph) for n in g.node
              if n.op_type == "Shape" and n.name.startswith("explainrt/") and n.input[0] in forward]
    if not shapes:
        return 0
    try:
        fresh = {name: list(info.shape) for name, info in tensor_infos(_for_shape_inference(model)).items()
                 if info.shape is not None}
    except (onnx.shape_inference.InferenceError, RuntimeError):
        return 0
    recorded = {name: list(info.shape) for name, info in tensor_infos(model).items() if info.shape is not None}
    batch = (fresh.get(image) or [None])[0]
    # a first axis is the batch where inference says so, or where the graph records it so (ONNX's Conv inference names
    # its output's first axis anew) and its other axes as inferred: a recorded static size is not trusted
    dims = {name: [batch, *shape[1:]] if shape and batch is not None and (recorded.get(name) or [None])[0] == batch
            and recorded[name][1:] == shape[1:] and not isinstance(shape[0], int) else shape
            for name, shape in fresh.items()}
    b = GraphBuilder(model)
    b.scope = "explainrt/shapes"
    made: dict[tuple[object, ...], str] = {}

    def shape_of(shape: list[object], start: int, end: int | None, batch_inferred: bool) -> str | None:
        """Shape(x, start, end) for x of ``shape`` from constants and the image's batch (``batch_inferred``: -1 for
        the batch, which the Reshapes reading it infer), else None."""
        picked = shape[start:end]
        if not picked or not all(isinstance(d, int) and d > 0 for d in picked[1:]):
            return None
        if isinstance(picked[0], int) and picked[0] > 0:
            return b.ints(picked)  # type: ignore[arg-type]
        if picked[0] is None or picked[0] != batch or start not in (0, -len(shape)):
            return None
        if batch_inferred:
            return b.ints([-1, *picked[1:]])  # type: ignore[list-item]
        if () not in made:  # the image's batch, read once for every shape
            made[()] = b.shape_slice(image, 0, 1)
        if tuple(picked) not in made:
            made[tuple(picked)] = b.concat([made[()], *([b.ints(picked[1:])] if len(picked) > 1 else [])], 0)  # type: ignore[arg-type]
        return made[tuple(picked)]

    as_reshape_sizes = _read_as_gradient_reshape_sizes(model)
    replaced = 0
    for node in shapes:
        attrs = {a.name: a.i for a in node.attribute}
        whole = not attrs.get("start") and "end" not in attrs
        value = shape_of(dims.get(node.input[0], []), attrs.get("start", 0), attrs.get("end"),
                         whole and node.output[0] in as_reshape_sizes)
        if value is not None:
            node.CopyFrom(onnx.helper.make_node("Identity", [value], list(node.output), name=node.name))
            replaced += 1
    if replaced:
        nodes = sort_topologically(list(model.graph.node))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return replaced


def _read_as_gradient_reshape_sizes(model: onnx.ModelProto) -> set[str]:
    """The tensors that every reader, in any of the model's graphs, reads as the tail of a gradient's size
    ``Concat(seeds, x)`` (``GradientBuilder.grad_shape``) that only Reshapes read as their size: there the forward
    tensor's batch may be -1, which each Reshape infers from the gradient's K * N * ... values (one -1: the seed
    count is a number, K >= 1: a gradient of no targets has no batch to infer)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for graph in _graphs(model.graph):
        for node in graph.node:
            for name in set(node.input):
                readers.setdefault(name, []).append(node)
    producers = {o: n for g in _graphs(model.graph) for n in g.node for o in n.output}
    outputs = {o.name for g in _graphs(model.graph) for o in g.output}

    def is_gradient_size(concat: onnx.NodeProto, tail: str) -> bool:
        seeds = producers.get(concat.input[0]) if len(concat.input) == 2 else None
        return concat.op_type == "Concat" and list(concat.input).index(tail) == 1 and seeds is not None \
            and seeds.name == GRADIENT_SEEDS and concat.output[0] not in outputs \
            and all(r.op_type == "Reshape" and list(r.input).index(concat.output[0]) == 1
                    for r in readers.get(concat.output[0], []))

    return {name for name, nodes in readers.items() if name not in outputs
            and all(is_gradient_size(node, name) for node in nodes)}


def _for_shape_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` inferred anew from its graph alone: its recorded shapes left out, and its initializers of more than
    64 values (weights) given as inputs of their type and shape, which is all inference reads of them (not copied:
    a ResNet-50's weights made this pass most of a second)."""
    graph = model.graph
    small = [t for t in graph.initializer if int(np.prod(t.dims)) <= 64]
    weights = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer
               if int(np.prod(t.dims)) > 64]
    bare = onnx.helper.make_model(onnx.helper.make_graph(graph.node, graph.name, [*graph.input, *weights], graph.output,
                                                         small), opset_imports=model.opset_import)
    bare.ir_version = model.ir_version
    return onnx.shape_inference.infer_shapes(bare)


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and the graphs of its nodes' subgraph attributes (an If's branches), nested ones too."""
    return [graph, *(inner for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
                     for inner in _graphs(a.g))]
