"""make_explainable: an ONNX model that also returns target-layer activations and their gradients.

From the target tensors to the logits it appends the reverse-mode derivative built from one VJP
rule per operator (``explainrt.autodiff.rules``); the names it adds and the metadata it stores
are described in ``explainrt.export.spec``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, version_converter

from explainrt.autodiff.builder import GraphBuilder, dequantized, opset_version, sort_topologically
from explainrt.autodiff.gradients import GradientBuilder, Node, Product, ancestors, append_gradients
from explainrt.autodiff.rules import QOPERATOR_HINT, QOPERATOR_OPS, RULES
from explainrt.autodiff.windows import run_on_windows
from explainrt.autodiff.zero_blocks import compute_on_blocks
from explainrt.autodiff.zero_branches import ZeroBranches, nest_in_sole_readers, run_when_nonzero
from explainrt.errors import (
    DynamicTokenGridError,
    InvalidInputError,
    InvalidModelError,
    UnknownLayerError,
    UnsupportedOperatorError,
)
from explainrt.export import heads, inputs, layers, layouts
from explainrt.export.forward_shapes import shapes_from_the_image
from explainrt.export.spec import (
    BOX_MATCHES_OUTPUT,
    BOX_OBJECTIVES,
    BOX_OBJECTIVES_OUTPUT,
    BOXES_INPUT,
    METADATA_KEY,
    OBJECTIVES,
    RESOLVED_TARGETS_OUTPUT,
    TARGETS_INPUT,
    WEIGHTED_BOX_OBJECTIVES,
    WEIGHTS_INPUT,
    ExplainableSpec,
    ModelSource,
    activations_output,
    gradients_output,
    load_model,
    prune_added_nodes,
    reference_input,
    relu_output,
    set_metadata,
)
from explainrt.preprocessing import Preprocessing

log = logging.getLogger(__name__)

MIN_OPSET = 13

def make_explainable(
    model: ModelSource,
    target_layers: str | Sequence[str] = "auto",
    logits: str | int | None = None,
    preprocessing: str | None = None,
    objective: str = "logit",
    defended_relus: bool = False,
    layer_layout: str | Sequence[str] | None = None,
    token_grid: tuple[int, int] | Sequence[tuple[int, int] | None] | None = None,
    prefix_tokens: int | Sequence[int | None] | None = None,
    input_layout: str | None = None,
    maps: str | Sequence[str] = (),
    maps_only: bool = False,
    maps_dtype: str = "float32",
    target_objective: bool = False,
    zero_branches: bool = False,
) -> onnx.ModelProto:
    """Return a copy of ``model`` that also outputs target-layer activations and gradients.

    ``target_layers`` is ``"auto"`` (see ``explainrt.export.layers``: the last sound feature map
    on the path to the logits, or a transformer's last-block normalisation) or a list of tensor
    names of layout ``[N, C, h, w]``, ``[N, h, w, C]`` or tokens ``[N, T, D]``, told from the
    graph or set by ``layer_layout`` ("nchw", "nhwc", "tokens"; one for all layers or one per
    layer); token grids are inferred from the image size (``token_grid=(h, w)`` and
    ``prefix_tokens=k`` set them). Activations and gradients are returned as ``[N, C, h, w]``.
    ``logits`` names the explained output (a tensor name or the index of a graph output), ``[N, classes]``
    or ``[N, classes, ...]`` (a class index then sums that channel over the other axes); by default
    the first graph output (or the input of a final Softmax/LogSoftmax).
    ``preprocessing`` is a Preprocessing JSON stored for the CLI and servers. ``objective``
    (see ``OBJECTIVES``) is the function of the logits whose gradient each target asks for; a
    loss is nonlinear in the logits, so its cotangent (softmax - one-hot) is formed in the graph.
    ``defended_relus`` (FGVis's defence against adversarial evidence): every Relu (and ReLU6,
    a Clip from 0) the gradient crosses passes it only where 0 < out <= reference, the reference
    being its activations on the unperturbed image, fed as input ``explainrt.reference.<k>``; the
    model also outputs those activations as ``explainrt.relu.<k>`` (k counts from the logits
    back), so a first run on the unperturbed image (references +inf) yields the references.
    ``input_layout`` ("nchw", "nhwc"; None: told from the graph and sizes) and the image input's type
    decide the adapter ``explainrt.export.inputs`` puts in front: the explainable model always takes
    float32 ``[N, C, H, W]``. Where the image's height and width are dynamic, the target layers are
    found on a copy at a nominal size (the preprocessing's, else 224 x 224) and serve every size.
    ``maps`` ("gradcam", "gradcam++", ...; see ``explainrt.export.heads``) appends each method's map
    computation: output ``explainrt.maps.<method>`` [N, K, H, W] (``maps_dtype`` float32, float16 or
    uint8); ``maps_only=True`` then drops the activation and gradient outputs. ``target_objective``: the
    maps are of the objective of target objects (a box, a region...), not of a class (``heads.closed_form``).
    ``zero_branches``: a box objective's reverse pass runs each scale's branch of a multi-scale head (and what
    depends on it alone) only when a prediction of that scale matched a box (``If`` nodes, see
    ``explainrt.autodiff.zero_branches``), and where the branch allows, on the window of the scale's grid
    around the matched cells (``explainrt.autodiff.windows``): for ONNX Runtime, applied last, to the model
    with its map heads.
    """
    if objective not in OBJECTIVES:
        raise InvalidInputError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    methods = heads.checked_maps(maps)
    for method in methods:  # before the (slow) rewrite
        heads.closed_form(method, objective, target_objective=target_objective)
    if maps_only and not methods:
        raise InvalidInputError("maps_only=True needs maps: name the methods whose maps the model returns")
    proto = _prepared(load_model(model))
    form = inputs.adapt(proto, input_layout)
    if form.layout != "nchw" or form.dtype != "float32":
        proto = _inferred(proto)
    builder = GradientBuilder(proto)
    image_input = inputs.image_input(proto).name
    logits_name = _logits(builder, logits)
    if logits_name not in {o.name for o in proto.graph.output}:  # an inner tensor (a final Softmax's input): the
        info = builder.info(logits_name)  # runtime returns graph outputs only, so it becomes one
        proto.graph.output.append(onnx.helper.make_tensor_value_info(
            logits_name, info.elem_type, None if info.shape is None else list(info.shape)))
    _refuse_qoperator(builder, logits_name)
    num_classes = _num_classes(builder, logits_name)
    output_info = builder.info(logits_name)
    output_shape = tuple(d if isinstance(d, int) else None for d in output_info.shape[1:])  # type: ignore[index]
    if objective in ("cross_entropy", "probability") and output_info.rank != 2:
        raise InvalidInputError(f"objective {objective!r} needs an output [N, classes]; {logits_name!r} has shape "
                                f"{output_info.shape}")
    count = 1 if isinstance(target_layers, str) else len(target_layers)
    chosen = _target_layers(proto, builder, image_input, target_layers, logits_name,
                            layouts.requests(count, layer_layout, token_grid, prefix_tokens), preprocessing)
    targets = [name for name, _ in chosen]
    log.info("explaining %s w.r.t. %s", logits_name, ", ".join(f"{n} ({l.kind})" for n, l in chosen))

    resolved, matched, box_objectives = None, None, None
    if objective == "weights":
        axes = [f"d{axis}" if d is None else d for axis, d in enumerate(output_shape, start=2)]
        weights = builder.add_input(WEIGHTS_INPUT, output_info.elem_type, ["N", "K", *axes])
        builder.scope = "explainrt/grad/seed"
        of, seed = logits_name, builder.op("Transpose", [weights], perm=[1, 0, *range(2, output_info.rank + 1)],
                                           like=logits_name)
    elif objective in BOX_OBJECTIVES:
        if output_info.rank != 3:
            raise InvalidInputError(f"objective {objective!r} needs a raw detector output of rank 3; {logits_name!r} "
                                    f"has shape {output_info.shape}")
        if objective in WEIGHTED_BOX_OBJECTIVES:
            axes = [f"d{axis}" if d is None else d for axis, d in enumerate(output_shape, start=2)]
            weights = builder.add_input(WEIGHTS_INPUT, output_info.elem_type, ["N", "K", *axes])
            boxes = builder.add_input(BOXES_INPUT, output_info.elem_type, ["N", "K", "B", 6])
            builder.scope = "explainrt/grad/seed"
            of, seed, matches = _weighted_box_seed(builder, logits_name, weights, boxes, BOX_OBJECTIVES[objective])
        else:
            boxes = builder.add_input(BOXES_INPUT, output_info.elem_type, ["N", "K", 6])
            builder.scope = "explainrt/grad/seed"
            # YOLOv8's seed is zero on the 4 box rows: seeded past them, the gradient skips the box branch; past the
            # class scores' Sigmoid too, its derivative taken on the boxes' classes alone
            of, rows = _past_zero_rows(builder, logits_name, 4, targets) if BOX_OBJECTIVES[objective] == "yolov8" \
                else (logits_name, None)
            below_sigmoid = _sigmoid_of(builder, of, targets) if rows is not None else None
            seed, matches, matched, box_objectives = _box_seed(builder, logits_name, boxes, BOX_OBJECTIVES[objective],
                                                               rows, None if below_sigmoid is None else of)
            of = below_sigmoid or of
    else:
        requested = builder.add_input(TARGETS_INPUT, TensorProto.INT64, ["N", "K"])
        resolved = _resolve_targets(builder, logits_name, requested)
        seeds = {"logit": _seed, "cross_entropy": _cross_entropy_seed, "probability": _probability_seed}
        of, seed = seeds[objective](builder, logits_name, resolved)
    rules = {**RULES, **_defended_relu_rules(builder)} if defended_relus else RULES
    first = len(proto.graph.node)
    gradients = append_gradients(builder, targets, of, seed, rules)
    blocked = [target for target in targets if target not in gradients]
    if blocked:
        raise InvalidModelError(f"no gradient reaches {blocked} from {logits_name!r}: every path from there passes "
                                f"integer tensors ({form.describe()} image input)")
    compute_on_blocks(builder, seed)
    scales = _scale_branches(builder, logits_name, of, targets, BOX_OBJECTIVES[objective], proto.graph.node[first:]) \
        if zero_branches and objective in BOX_OBJECTIVES and matched is not None else None

    builder.scope = "explainrt/outputs"
    if resolved is not None:
        builder.add_output(RESOLVED_TARGETS_OUTPUT, resolved, TensorProto.INT64, ["N", "K"])
    if objective in BOX_OBJECTIVES:
        builder.add_output(BOX_MATCHES_OUTPUT, matches, TensorProto.INT64,
                           ["N", "K", "B"] if objective in WEIGHTED_BOX_OBJECTIVES else ["N", "K"])
    if box_objectives is not None:
        builder.add_output(BOX_OBJECTIVES_OUTPUT, box_objectives, TensorProto.FLOAT, ["N", "K"])
    for index, (target, layout) in enumerate(chosen):
        elem_type = builder.info(target).elem_type
        channels_hw = [layout.channels, *_declared_grid(builder, target, layout)]
        builder.add_output(activations_output(index), layouts.to_nchw(builder, target, layout, 1), elem_type,
                           ["N", *channels_hw])
        as_maps = layouts.to_nchw(builder, gradients[target], layout, 2)
        per_image = builder.op("Transpose", [as_maps], perm=[1, 0, 2, 3, 4])
        builder.add_output(gradients_output(index), per_image, elem_type, ["N", "K", *channels_hw])

    prune_added_nodes(proto)
    _dequantized_constants(proto)
    spec = ExplainableSpec(image_input, logits_name, num_classes, tuple(targets), preprocessing, objective,
                           tuple(layout.to_json() for _, layout in chosen), output_shape=output_shape)
    set_metadata(proto, METADATA_KEY, spec.to_json())
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        raise InvalidModelError(f"the explainable model failed ONNX validation: {error}") from error
    if methods:
        proto = heads.add_map_heads(proto, methods, maps_only, maps_dtype, target_objective=target_objective,
                                    forward_shapes=False)  # that pass runs last here, after the scales' branches
    if scales is not None:
        _skip_unmatched_scales(proto, scales, matched)  # type: ignore[arg-type]
    shapes_from_the_image(proto, image_input)
    return proto


DEQUANTIZED_PREFIX = "explainrt/dequantized/"


def _dequantized_constants(model: onnx.ModelProto) -> None:
    """Give the gradient graph its own float copy of each quantized weight it reads (an int8 QDQ model's
    ``DequantizeLinear`` of initializers, e.g. the classifier's matrix the gradient multiplies by), in place.

    Same values, computed once here instead of on every call: ONNX Runtime keeps such a DequantizeLinear
    unfolded for its QDQ fusions and, with a second consumer, runs a duplicate of it per call (the default
    model quantized to int8, batch 1: the classifier's 1.28M-weight dequantization was about a quarter of
    the explainable model's extra kernel time in ONNX Runtime's profile). The forward pass keeps its own
    DequantizeLinear and whatever ONNX Runtime fuses it into. The copies cost 4 bytes per weight the
    gradient reads (at most the fp32 model's size of those layers).
    """
    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.name.startswith("explainrt/"):
            for name in node.input:
                readers.setdefault(name, []).append(node)
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.output[0] not in readers:
            continue
        values = dequantized(node, constants)
        if values is None:
            continue
        name = f"{DEQUANTIZED_PREFIX}{node.output[0]}"
        graph.initializer.append(onnx.numpy_helper.from_array(values, name))
        for reader in readers[node.output[0]]:
            reader.input[:] = [name if value == node.output[0] else value for value in reader.input]


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """Upgrade old opsets and run shape inference (the rules need ranks, dtypes and sizes)."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise InvalidModelError(f"invalid ONNX model: {error}") from error
    if opset_version(model) < MIN_OPSET:
        before = opset_version(model)
        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as error:  # the converter raises bare RuntimeErrors of many kinds
            raise InvalidModelError(f"cannot upgrade the model to opset {MIN_OPSET}: {error}") from error
        if before < 11:
            _keep_asymmetric_resizes(model)
    for _ in range(4):  # folded sizes make more shapes static, which may fold more
        model = _inferred(model)
        if not _fold_static_shape_arithmetic(model):
            break
    return model


FOLDED_OPS = {"Add", "Sub", "Mul", "Div", "Cast", "Unsqueeze", "Squeeze", "Concat", "Gather", "Slice", "Range",
              "Floor", "Ceil", "Neg", "Max", "Min", "Reshape", "Equal", "Where", "Mod", "Identity"}
"""Operators whose small integer results are computed once here when every input is known."""


def _batch_size_arithmetic(node: onnx.NodeProto, partial: dict[str, list[int | None]], known: dict[str, np.ndarray],
                           batch: dict[str, list[int | None]]) -> bool:
    """Follow the batch size (``Shape(x)[0]``, unknown) through Gather, Unsqueeze and Concat with known
    sizes into ``batch`` (None marks it); whether ``node`` was one of those steps."""
    if node.op_type == "Gather" and node.input[0] in partial and node.input[1] in known:
        where = known[node.input[1]]
        if where.ndim == 0 and int(where) == 0 and partial[node.input[0]][0] is None:
            batch[node.output[0]] = [None]
            return True
    if node.op_type == "Unsqueeze" and node.input[0] in batch:
        batch[node.output[0]] = batch[node.input[0]]
        return True
    if node.op_type == "Concat" and any(i in batch for i in node.input) and all(
            i in batch or (i in known and known[i].ndim == 1) for i in node.input):
        sizes = [d for i in node.input for d in (batch[i] if i in batch else known[i].tolist())]
        if sizes.count(None) == 1 and sizes[0] is None:
            batch[node.output[0]] = sizes
            return True
    return False


def _fold_static_shape_arithmetic(model: onnx.ModelProto) -> int:
    """Integer arithmetic on the static parts of tensors' shapes (an exporter's ``Shape -> Gather -> Div``
    for a split size, with only the batch dynamic) becomes constants, so the rules that need constant
    arguments (Slice's starts and ends, Reshape's shape) take models exported with a dynamic batch.
    Changes ``model`` in place; returns how many nodes became constants."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*graph.input, *graph.value_info, *graph.output) if v.type.tensor_type.HasField("shape")}
    known = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    partial: dict[str, list[int | None]] = {}  # Shape outputs with some dims unknown
    batch: dict[str, list[int | None]] = {}  # the batch size (None) among known sizes: Reshape can copy it with 0
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = 0
    for index, node in enumerate(graph.node):
        value = None
        if _batch_size_arithmetic(node, partial, known, batch):
            outputs = {o.name for o in graph.output}
            if node.op_type == "Concat" and node.output[0] not in outputs and all(
                    c.op_type == "Reshape" and c.input[1] == node.output[0] and (shapes.get(c.input[0]) or [0])[0] is None
                    and not any(a.name == "allowzero" and a.i for a in c.attribute)
                    for c in consumers.get(node.output[0], [])):
                value = np.array([0 if d is None else d for d in batch[node.output[0]]], dtype=np.int64)
            else:
                continue
        elif node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            known[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            continue
        if node.op_type == "Shape" and node.input[0] in shapes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            dims = shapes[node.input[0]][attrs.get("start", 0):attrs.get("end")]
            if all(d for d in dims):
                value = np.array(dims, dtype=np.int64)
            else:
                partial[node.output[0]] = dims
        elif node.op_type == "Gather" and node.input[0] in partial and node.input[1] in known:
            picked = np.asarray(partial[node.input[0]], dtype=object)[known[node.input[1]]]
            if all(d for d in np.ravel(picked)):
                value = np.asarray(picked, dtype=np.int64)
        elif node.op_type in FOLDED_OPS and node.input and all(not i or i in known for i in node.input):
            try:
                value = ReferenceEvaluator(node).run(None, {i: known[i] for i in node.input if i})[0]
            except Exception:  # noqa: BLE001 - an operator the reference runtime cannot evaluate stays as it is
                value = None
        if value is None or np.asarray(value).dtype.kind not in "iu" or np.size(value) > 64:
            continue
        value = np.asarray(value)
        known[node.output[0]] = value
        graph.node[index].CopyFrom(onnx.helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                                         value=numpy_helper.from_array(value, node.output[0])))
        folded += 1
    if folded:
        log.info("folded %d integer shape computations into constants", folded)
        # shapes inferred before are kept by the next inference: drop those the constants may complete
        vague = [v for v in graph.value_info if any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim[1:])]
        for value in vague:
            graph.value_info.remove(value)
    return folded


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as error:
        raise InvalidModelError(f"ONNX shape inference failed on the model: {error}") from error


NOMINAL_SIZE = (224, 224)
"""The image size the target layers of a model with dynamic height and width are looked for at."""


def _target_layers(proto: onnx.ModelProto, builder: GradientBuilder, image: str, requested: str | Sequence[str],
                   logits: str, requests: list[layouts.LayoutRequest],
                   preprocessing: str | None) -> list[tuple[str, layouts.Layout]]:
    """The target layers and layouts; for a dynamic image size, found on a probe at the nominal size (grids
    are read there; a token grid fixed by that size is refused: it would not serve other sizes)."""
    shape = builder.info(image).shape or (None,) * 4
    if all(isinstance(v, int) for v in shape[2:4]):
        return layers.target_layers(builder, image, requested, logits, requests)
    size = Preprocessing.from_json(preprocessing).input_size if preprocessing else NOMINAL_SIZE
    probe = inputs.with_nominal_size(proto, size)
    if probe is None:
        return layers.target_layers(builder, image, requested, logits, requests)
    chosen = layers.target_layers(GradientBuilder(probe), image, requested, logits, requests)
    for (name, layout), request in zip(chosen, requests):
        if layout.kind == "tokens" and request.token_grid is None:
            raise DynamicTokenGridError(f"target layer {name!r} holds tokens but the image size is dynamic: give "
                                    "token_grid=(h, w) (and prefix_tokens)")
        if name not in builder.infos:
            raise UnknownLayerError(f"target layer {name!r} has no known type in the model")
    log.info("the image size is dynamic: target layers found at %dx%d", *size)
    return chosen


def _declared_grid(builder: GradientBuilder, target: str, layout: layouts.Layout) -> list[object]:
    """The target's grid as the graph knows it: symbolic where the image size is dynamic."""
    shape = builder.info(target).shape
    if layout.kind == "tokens" or shape is None:
        return list(layout.grid)
    grid = shape[2:4] if layout.kind == "nchw" else shape[1:3]
    return [v if isinstance(v, int) else (v or f"{axis}") for v, axis in zip(grid, ("h", "w"))]


def _keep_asymmetric_resizes(model: onnx.ModelProto) -> None:
    """Upsample and Resize before opset 11 map output pixel x to input x / scale (nearest: its floor,
    or its ceiling along axes scaled down, as ONNX Runtime does); the version converter turns them
    into Resize nodes that read as half_pixel and round_prefer_floor, another image: spell them out."""
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    for node in model.graph.node:
        if node.op_type != "Resize" or any(a.name == "coordinate_transformation_mode" for a in node.attribute):
            continue
        node.attribute.append(onnx.helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        mode = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"nearest")
        if mode != b"nearest":
            continue
        scales = constants.get(node.input[2]) if len(node.input) > 2 else None
        if scales is None:
            raise InvalidModelError(f"Resize/Upsample {node.name!r} of the old opset has scales computed at run time: "
                                    "its nearest rounding cannot be carried to opset 11+; export with opset >= 11")
        resized = [float(v) for v in onnx.numpy_helper.to_array(scales).reshape(-1) if v != 1]
        if any(v < 1 for v in resized) and any(v > 1 for v in resized):
            raise InvalidModelError(f"Resize {node.name!r} of the old opset scales some axes up and others down: its "
                                    "nearest rounding cannot be carried to opset 11+; export with opset >= 11")
        rounding = "ceil" if any(v < 1 for v in resized) else "floor"
        node.attribute.append(onnx.helper.make_attribute("nearest_mode", rounding))


def _logits(builder: GradientBuilder, requested: str | int | None) -> str:
    graph = builder.graph
    if isinstance(requested, int) and not isinstance(requested, bool):
        if not 0 <= requested < len(graph.output):
            raise UnknownLayerError(f"output index {requested} is out of range: the model has {len(graph.output)} "
                                    f"outputs ({', '.join(o.name for o in graph.output)})")
        return graph.output[requested].name
    if requested is not None:
        if requested not in builder.infos:
            raise UnknownLayerError(f"logits tensor {requested!r} not found{layers.suggest(requested, builder.infos)}")
        return requested
    name = graph.output[0].name
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type in ("Softmax", "LogSoftmax"):
        log.info("the model ends in %s: explaining its input %s", producer.op_type, producer.input[0])
        return producer.input[0]
    return name


def _refuse_qoperator(builder: GradientBuilder, logits: str) -> None:
    """A QOperator-format model (integer operators throughout) has no float path for the layer search
    to find: say so, and what to do, before the search reports no layer."""
    upstream = ancestors(builder.graph, logits)
    node = next((n for n in builder.graph.node if n.op_type in QOPERATOR_OPS and n.output[0] in upstream), None)
    if node is not None:
        raise UnsupportedOperatorError(node.op_type, node.name or node.output[0], QOPERATOR_HINT)


def _num_classes(builder: GradientBuilder, logits: str) -> int:
    info = builder.info(logits)
    if info.rank is None or info.rank < 2 or not isinstance(info.shape[1], int):  # type: ignore[index]
        raise InvalidModelError(f"the explained output {logits!r} must have shape [N, classes] or [N, classes, ...] "
                                f"with a known number of classes, got {info.shape}")
    return info.shape[1]  # type: ignore[index, return-value]


def _resolve_targets(b: GradientBuilder, logits: str, requested: str) -> str:
    """Targets < 0 mean 'the k-th most likely class': look them up in the sorted logits (summed
    over the axes after the classes' on an output [N, classes, ...])."""
    b.scope = "explainrt/targets"
    classes = b.ints([_num_classes(b, logits)])
    rank = b.rank(logits)
    scores = logits if rank == 2 else b.op("ReduceSum", [logits, b.ints(list(range(2, rank)))], keepdims=0)
    ranked = b.op_multi("TopK", [scores, classes], outputs=2, axis=1, largest=1, sorted=1)[1]
    rank = b.op("Max", [b.op("Sub", [b.ints([-1]), requested]), b.ints([0])])  # -k -> k - 1; a class -> 0
    by_rank = b.op("GatherElements", [ranked, rank], axis=1)
    return b.op("Where", [b.op("Less", [requested, b.ints([0])]), by_rank, requested])


def shallow_target_ranking(model: onnx.ModelProto) -> onnx.ModelProto:
    """The explainable ``model`` (changed in place) ranking only as many classes as its deepest target
    asks for: the TopK that resolves targets -k gets k = clip(max(-targets), 1, classes) instead of every
    class (ONNX Runtime then selects the top class of 1000 rather than sorting them all: 0.1 ms of the
    default model's 5 ms at batch 1). Same resolved targets (TopK orders equal scores by index either
    way). For ONNX Runtime: TensorRT wants a constant K, so exported models keep the full ranking."""
    graph = model.graph
    top_k = next((n for n in graph.node if n.name == "explainrt/targets/TopK" and n.op_type == "TopK"), None)
    by_rank = next((n for n in graph.node if top_k is not None and n.op_type == "GatherElements"
                    and n.name.startswith("explainrt/targets/") and n.input[0] == top_k.output[1]), None)
    if by_rank is None or not any(i.name == TARGETS_INPUT for i in graph.input):
        return model
    b = GradientBuilder(model)
    b.scope = "explainrt/targets/depth"
    # the deepest rank asked for (ranks are >= 0: a class's is 0), plus one, in 1..classes (no targets: ReduceMax of
    # nothing is the lowest int64)
    deepest = b.reduce("ReduceMax", by_rank.input[1], [0, 1], keepdims=False)  # a scalar
    depth = b.op("Min", [b.op("Max", [b.op("Add", [deepest, b.ints([1])]), b.ints([1])]),
                         b.ints([ExplainableSpec.from_model(model).num_classes])])
    top_k.input[1] = depth  # type: ignore[union-attr]
    nodes = sort_topologically(list(graph.node))  # the ranks and the depth before the TopK
    del graph.node[:]
    graph.node.extend(nodes)
    prune_added_nodes(model)  # the class count the TopK read (computed from the logits' shape in older exports)
    return model


def _seed(b: GradientBuilder, logits: str, resolved: str) -> tuple[str, str]:
    """Where the reverse pass starts, and its cotangent [K, N, ...].

    The gradient of logit t w.r.t. the input of a final linear layer (Gemm with constant
    weights) is row t of the weights: gathering it skips the [classes x features] matrix
    product a one-hot cotangent would cost (about 3% of ResNet-50's inference at batch 1).
    """
    b.scope = "explainrt/grad/seed"
    head = next((n for n in b.graph.node if logits in n.output), None)
    if head is None or head.op_type != "Gemm" or b.rank(logits) != 2 or b.constant_value(head.input[1]) is None:
        return logits, _one_hot_seed(b, logits, resolved)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    if attrs.get("transA", 0):
        return logits, _one_hot_seed(b, logits, resolved)
    per_seed = b.op("Transpose", [resolved], perm=[1, 0])
    if attrs.get("transB", 0):  # weights [classes, features]
        rows = b.op("Gather", [head.input[1], per_seed], axis=0, like=head.input[0])
    else:  # weights [features, classes]
        rows = b.op("Transpose", [b.op("Gather", [head.input[1], per_seed], axis=1)], perm=[1, 2, 0], like=head.input[0])
    alpha = float(attrs.get("alpha", 1.0))
    return head.input[0], rows if alpha == 1.0 else b.op("Mul", [rows, b.scalar_like(alpha, head.input[0])], like=head.input[0])


def _one_hot_seed(b: GradientBuilder, logits: str, resolved: str) -> str:
    """Cotangent [K, N, classes, ...]: one-hot rows of the resolved targets (on an output
    [N, classes, ...], the same over the other axes: the class's scores summed)."""
    per_seed = b.unsqueeze(b.op("Transpose", [resolved], perm=[1, 0]), [-1])
    count = b.squeeze(b.shape_slice(logits, 1, 2), [0])
    class_ids = b.op("Range", [b.constant(0, dtype=TensorProto.INT64), count, b.constant(1, dtype=TensorProto.INT64)])
    hot = b.op("Equal", [per_seed, class_ids])
    rank = b.rank(logits)
    if rank == 2:
        return b.op("Cast", [hot], to=b.info(logits).elem_type, name="explainrt/grad/seed", like=logits)
    cast = b.op("Cast", [b.unsqueeze(hot, list(range(3, rank + 1)))], to=b.info(logits).elem_type)
    return b.op("Expand", [cast, b.shape(logits)], name="explainrt/grad/seed", like=logits)


def _cross_entropy_seed(b: GradientBuilder, logits: str, resolved: str) -> tuple[str, str]:
    """Cotangent of -log softmax(y)_t: softmax(y) - one_hot(t), [K, N, classes]."""
    softmax = b.op("Softmax", [logits], axis=-1, like=logits)
    return logits, b.op("Sub", [softmax, _one_hot_seed(b, logits, resolved)], name="explainrt/grad/seed/cross_entropy",
                        like=logits)


def _probability_seed(b: GradientBuilder, logits: str, resolved: str) -> tuple[str, str]:
    """Cotangent of p_t = softmax(y)_t: p_t (one_hot(t) - p), [K, N, classes]."""
    p = b.op("Softmax", [logits], axis=-1, like=logits)
    hot = _one_hot_seed(b, logits, resolved)
    p_t = b.op("ReduceSum", [b.op("Mul", [hot, p], like=logits), b.ints([-1])], keepdims=1)
    return logits, b.op("Mul", [p_t, b.op("Sub", [hot, p], like=logits)], name="explainrt/grad/seed/probability",
                        like=logits)


def _box_seed(b: GradientBuilder, logits: str, boxes: str, layout: str, rows: tuple[int, int] | None = None,
              scores: str | None = None) -> tuple[str, str, str, str]:
    """Cotangent [K, N, *shape(y)[1:]] of each box target on a raw detector head y, how many predictions each box
    matched [N, K] (int64), which [K, N, anchors] (0/1) and the objective [N, K] (the matched predictions' class
    scores summed, what ``Box.score`` computes, without a second pass in Python). ``boxes`` [N, K, 6]: x1, y1, x2, y2 (input
    pixels), class, IoU threshold. ``rows`` (YOLOv8): the cotangent of only the fields [start, stop) of y's
    axis 1, made from the class's rows and the matches (a product of two small factors: no full-size slice).
    ``scores``: those rows, s = Sigmoid(x) (``_sigmoid_of``): the cotangent of x instead, the matches times
    s (1 - s) on the class's row, read with a gather (no full-size derivative).
    Everything is computed in [K, N] order from the boxes on (transposed while they are small): a Transpose of
    a factor next to the full-size product is one ONNX Runtime moves past it, onto the product.
    Which predictions count (IoU of their cx, cy, w, h box with the given box >= the threshold) is decided on
    this pass and held constant: the objective is linear in the scores (YOLOv5: objectness x class score)."""
    like = logits
    fields = logits if layout == "yolov8" else b.op("Transpose", [logits], perm=[0, 2, 1], like=like)  # [N, F, A]
    # each box's fields [K, N, 6, 1]: corners (x1, y1) and (x2, y2) as pairs [K, N, 2, 1], class, threshold
    per_box = b.unsqueeze(b.op("Transpose", [boxes], perm=[1, 0, 2], like=boxes), [3])
    low_corner, high_corner, chosen_class, threshold = b.op_multi("Split", [per_box, b.ints([2, 2, 1, 1])],
                                                                    outputs=4, axis=2)

    def binary(op: str, x: str, y: str) -> str:
        return b.op(op, [x, y], like=like)

    # the predictions' centres and sizes as (x, y) pairs [N, 2, A]: each step below works on both axes at once
    centres, sizes = (b.op("Slice", [fields, b.ints([i]), b.ints([i + 2]), b.ints([1])], like=like) for i in (0, 2))
    half = binary("Mul", sizes, b.scalar_like(0.5, like))
    low, high = binary("Sub", centres, half), binary("Add", centres, half)
    overlap = binary("Max", binary("Sub", binary("Min", high, high_corner), binary("Max", low, low_corner)),
                     b.scalar_like(0.0, like))  # [K, N, 2, A]: across, down
    inter = b.reduce("ReduceProd", overlap, [2])  # [K, N, 1, A]
    area = b.reduce("ReduceProd", binary("Sub", high_corner, low_corner), [2])  # [K, N, 1, 1]
    union = binary("Sub", binary("Add", b.op("Abs", [b.reduce("ReduceProd", sizes, [1])], like=like), area), inter)
    iou = binary("Div", inter, binary("Max", union, b.scalar_like(1e-12, like)))
    counted = b.op("Cast", [b.op("GreaterOrEqual", [iou, threshold])], to=b.info(like).elem_type)  # [K, N, 1, A]
    mask = b.squeeze(counted, [2])  # [K, N, A]
    counts = b.reduce("ReduceSum", mask, [2], keepdims=False)  # [K, N]
    matches = b.op("Cast", [b.op("Transpose", [counts], perm=[1, 0])], to=TensorProto.INT64)
    first = 4 if layout == "yolov8" else 5
    shape = b.info(logits).shape or ()
    start, stop = (0, shape[1 if layout == "yolov8" else 2] if len(shape) == 3 else None) if rows is None else rows
    fields_of_rows = _field_numbers(b, fields, start, stop, b.info(like).elem_type)  # [F, 1]
    hot = b.op("Cast", [b.op("Equal", [fields_of_rows, binary("Add", chosen_class, b.scalar_like(first, like))])],
               to=b.info(like).elem_type)  # [K, N, F, 1]
    matched = counted

    def objectives(values: str) -> str:
        """The matched predictions' ``values`` [K, N, 1, A] summed in float32, [N, K]; 0 for a class the output does
        not have (no row of ``hot``: its seed is zero too)."""
        product = binary("Mul", matched, binary("Mul", values, b.reduce("ReduceMax", hot, [2])))
        if b.info(like).elem_type != TensorProto.FLOAT:  # a float16 model's: summed in float32
            product = b.op("Cast", [product], to=TensorProto.FLOAT)
        return b.op("Transpose", [b.reduce("ReduceSum", product, [2, 3], keepdims=False)], perm=[1, 0])

    if layout == "yolov8":  # the class's row times the matches
        class_scores = _class_row(b, fields if scores is None else scores, chosen_class, first - (0 if scores is None
                                                                                                   else start), like)
        if scores is not None:  # s (1 - s) of each box's class: its row among the rows held
            counted = binary("Mul", counted, binary("Mul", class_scores, binary("Sub", b.scalar_like(1.0, like),
                                                                                 class_scores)))
        seed = b.op("Mul", [hot, counted], name="explainrt/grad/seed/boxes", like=like)
        b.products[seed] = Product(hot, counted, (-1,))
        return seed, matches, mask, objectives(class_scores)
    # d(objectness * class score): class score on the objectness row, objectness on the class row
    each = b.unsqueeze(fields, [0])  # [1, N, F, A]
    objectness = b.op("Slice", [each, b.ints([4]), b.ints([5]), b.ints([2])], like=like)  # [1, N, 1, A]
    class_scores = b.reduce("ReduceSum", binary("Mul", hot, each), [2])  # [K, N, 1, A]
    is_objectness = b.op("Cast", [b.op("Equal", [fields_of_rows, b.scalar_like(4.0, like)])], to=b.info(like).elem_type)
    seed = binary("Mul", counted, binary("Add", binary("Mul", hot, objectness), binary("Mul", is_objectness, class_scores)))
    return (b.op("Transpose", [seed], perm=[0, 1, 3, 2], name="explainrt/grad/seed/boxes", like=like), matches, mask,
            objectives(binary("Mul", objectness, class_scores)))


def _class_row(b: GradientBuilder, values: str, chosen_class: str, offset: int, like: str) -> str:
    """Row ``chosen_class + offset`` of ``values`` [N, F, A] for each box (``chosen_class`` [K, N, 1, 1]), gathered per
    image as [K, N, 1, A]; a class outside the rows reads the nearest row (its box's one-hot row is zero there)."""
    row = b.op("Cast", [b.squeeze(b.op("Add", [chosen_class, b.scalar_like(offset, like)], like=like), [3])],
               to=TensorProto.INT64)
    last = b.op("Sub", [b.shape_slice(values, 1, 2), b.constant([1], dtype=TensorProto.INT64)])
    row = b.op("Min", [b.op("Max", [row, b.constant([0], dtype=TensorProto.INT64)]), last])
    per_image = b.op("Transpose", [row], perm=[1, 0, 2])  # [N, K, 1]
    where = b.op("Expand", [per_image, b.concat([b.shape_slice(per_image, 0, 2), b.shape_slice(values, 2, 3)], 0)])
    return b.op("Transpose", [b.unsqueeze(b.op("GatherElements", [values, where], axis=1, like=like), [2])],
                perm=[1, 0, 2, 3], like=like)


def _field_numbers(b: GradientBuilder, fields: str, start: int, stop: object, elem_type: int) -> str:
    """The numbers start, ..., stop - 1 of a detector output's fields [F, 1] in its type: a constant where the
    output's field count ``stop`` is static, else counted from ``fields`` [N, F, A] at run time."""
    if isinstance(stop, int):
        return b.constant(np.arange(start, stop)[:, None], dtype=elem_type)
    count = b.squeeze(b.shape_slice(fields, 1, 2), [0])
    numbers = b.op("Range", [b.constant(start, dtype=TensorProto.INT64), count, b.constant(1, dtype=TensorProto.INT64)])
    return b.unsqueeze(b.op("Cast", [numbers], to=elem_type), [1])


def _past_zero_rows(b: GradientBuilder, y: str, first: int, targets: Sequence[str]) -> tuple[str, tuple[int, int] | None]:
    """The tensor to seed and the rows [start, stop) of y's axis 1 it holds (None: y itself), when y's cotangent
    is zero on rows ``[0, first)`` and y concatenates parts along that axis (YOLOv8's head: the 4 box rows, then
    the sigmoid class scores): the part holding every other row, if every target layer reaches it. Exact, and
    the reverse pass skips the parts whose cotangent is zero (YOLOv8's box branch: its convolutions at every
    scale, the DFL softmax)."""
    offset, rows = 0, None
    while (node := b.producer(y)) is not None and node.op_type == "Concat":
        axis = _attribute_int(node, "axis")
        if axis % b.rank(y) != 1:
            break
        infos = [b.infos.get(x) for x in node.input]
        sizes = [info.shape[1] if info is not None and info.shape and len(info.shape) > 1 else None for info in infos]
        if not all(isinstance(size, int) for size in sizes):
            break
        starts = list(itertools.accumulate([0, *sizes[:-1]]))
        holding = [i for i, (start, size) in enumerate(zip(starts, sizes)) if start + size > first]
        if len(holding) != 1:
            break
        (index,) = holding
        if not set(targets) <= ancestors(b.graph, node.input[index]):
            break
        start, size = starts[index], sizes[index]
        y = node.input[index]
        offset += start
        rows = (offset, offset + size)
        first = max(first - start, 0)
    return y, rows


def _sigmoid_of(b: GradientBuilder, y: str, targets: Sequence[str]) -> str | None:
    """x where y = Sigmoid(x) and every target layer reaches x (YOLOv8's class scores): a box objective's seed
    then lands on x, the derivative taken on the boxes' classes only; else None."""
    node = b.producer(y)
    if node is None or node.op_type != "Sigmoid" or not set(targets) <= ancestors(b.graph, node.input[0]):
        return None
    return node.input[0]


@dataclass(frozen=True)
class _ScaleBranches:
    """The reverse pass of a box objective, and the anchors each scale's gradient covers: what
    ``_skip_unmatched_scales`` needs once the model is finished."""

    anchors: dict[str, tuple[int, int]]  # a scale's gradient (of its part of the anchor Concat) -> its anchors
    record: ZeroBranches  # sources left empty: their flags are made last
    elem_type: int  # the matches' (the output's)


def _scale_branches(b: GradientBuilder, logits: str, of: str, targets: Sequence[str], layout: str,
                    reverse: Sequence[onnx.NodeProto]) -> _ScaleBranches | None:
    """The scales of a multi-scale detector head: the forward Concat nearest the output along its anchor axis
    (static sizes adding up to the output's anchors), each part's gradient and the anchors it covers; None
    when there is none, or when a scale's gradient may be non-zero with none of its anchors seeded
    (``_anchors_kept_apart``)."""
    axis = 2 if layout == "yolov8" else 1
    shape = b.info(logits).shape or ()
    count = shape[axis] if len(shape) == 3 else None
    concat = None
    for node in b.graph.node:
        forward = node.op_type == "Concat" and not node.name.startswith("explainrt/")
        if not forward or (node.name or node.output[0]) not in b.node_gradients:
            continue
        infos = [b.infos.get(x) for x in node.input]
        sizes = [info.shape[axis] if info is not None and info.shape and len(info.shape) == 3 else None for info in infos]
        if _attribute_int(node, "axis") % 3 == axis and all(isinstance(s, int) for s in sizes) and sum(sizes) == count:  # type: ignore[arg-type]
            concat = (node, sizes)
    if concat is None or not _anchors_kept_apart(b, concat[0], of, targets, axis):
        return None
    node, sizes = concat
    starts = list(itertools.accumulate([0, *sizes[:-1]]))
    anchors = {gradient: (start, start + size) for gradient, start, size in
               zip(b.node_gradients[node.name or node.output[0]], starts, sizes) if gradient is not None}
    elem_types = {x: b.infos[x].elem_type for x, _ in b.gradient_of.values() if x in b.infos and b.infos[x].is_float}
    record = ZeroBranches({}, dict(b.gradient_of), elem_types, frozenset(n.name for n in reverse), b.seeds)
    return _ScaleBranches(anchors, record, b.info(logits).elem_type) if len(anchors) > 1 else None


ANCHORWISE_OPS = {"Identity", "Sigmoid", "Relu", "Tanh", "Exp", "Neg", "Mul", "Add", "Sub", "Div"}
"""Operators that act on each anchor's values apart (element-wise), between a head's anchor Concat and its output."""


def _anchors_kept_apart(b: GradientBuilder, concat: onnx.NodeProto, of: str, targets: Sequence[str], axis: int) -> bool:
    """Whether the gradient of each part of the anchor ``concat`` is zero when the cotangent of ``of`` is zero on
    the part's anchors: every path from the target layers to ``of`` passes ``concat``, and from it to ``of`` only
    element-wise operators and Split / Slice / Concat along other axes act (anchors keep their place)."""
    if set(targets) & ancestors(b.graph, of, stop=concat.output[0]):
        return False
    upstream, reached = ancestors(b.graph, of), {concat.output[0]}
    for node in b.graph.node:
        if node is concat or node.name.startswith("explainrt/") or not reached.intersection(node.input) \
                or not upstream.intersection(node.output):
            continue
        reached.update(node.output)
        if node.op_type in ("Split", "Concat"):
            kept = _attribute_int(node, "axis") % 3 != axis
        elif node.op_type == "Slice":
            axes = b.constant_value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            kept = axes is not None and axis not in {int(a) % 3 for a in axes.reshape(-1)}
        else:
            kept = node.op_type in ANCHORWISE_OPS
        if not kept or any(len(b.infos[o].shape or ()) != 3 for o in node.output if o in b.infos):
            return False
    return True


def _attribute_int(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    """Integer attribute ``name`` of ``node`` (``default`` where it has none)."""
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _skip_unmatched_scales(model: onnx.ModelProto, scales: _ScaleBranches, matched: str) -> None:
    """Run each scale's reverse branch of the finished ``model`` only when a box matched a prediction of that
    scale (``matched`` [K, N, anchors]: the box seed's 0/1 matches), on the window of its grid those matches
    reach where the branch allows (``run_on_windows``), in place. A wrapped model that fails ONNX's checks
    (types, shapes) is not kept: the model stays as it was."""
    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    b = GraphBuilder(wrapped)
    b.scope = "explainrt/zero_branches/flags"
    zero = b.constant(0.0, dtype=scales.elem_type)

    flags = {}
    for gradient, (start, stop) in scales.anchors.items():
        part = b.op("Slice", [matched, b.ints([start]), b.ints([stop]), b.ints([2])])
        flags[gradient] = b.op("Greater", [b.reduce("ReduceMax", part, [0, 1, 2], keepdims=False), zero])
    record = dataclasses.replace(scales.record, sources=flags)
    branches = run_when_nonzero(wrapped, record)
    if not branches:
        return
    prune_added_nodes(wrapped)  # the flags of scales whose branch stayed as it was
    failure = _failed_checks(wrapped)
    if failure:
        log.warning("the reverse pass runs every scale's branch: the model with If nodes failed ONNX's checks (%s)",
                    failure)
        return
    windowed = onnx.ModelProto()
    windowed.CopyFrom(wrapped)
    if run_on_windows(windowed, branches, scales.anchors, matched, record):
        failure = _failed_checks(windowed)
        if failure:
            log.warning("the scales' branches run on their whole grids: the model with windows failed ONNX's "
                        "checks (%s)", failure)
        else:
            wrapped = windowed
    nest_in_sole_readers(wrapped, branches)
    model.CopyFrom(wrapped)


def _failed_checks(model: onnx.ModelProto) -> str | None:
    """Why ONNX's checker or its strict shape inference refuses ``model``; None when both pass."""
    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return str(error)
    return None


def _weighted_box_seed(b: GradientBuilder, logits: str, weights: str, boxes: str, layout: str) -> tuple[str, str, str]:
    """Cotangent [K, N, *shape(y)[1:]] of target k = sum(weights[:, k] * y) plus the box objectives of its B
    boxes (``boxes`` [N, K, B, 6], as ``_box_seed``'s), and each box's match count [N, K, B]: a Box mixed
    with other linear targets, or a sum of boxes, in one pass (padding boxes have an IoU threshold > 1)."""
    flat = b.op("Reshape", [boxes, b.ints([0, -1, 6])], like=boxes)  # [N, K * B, 6]
    per_box, matches, _, _ = _box_seed(b, logits, flat, layout)  # [K * B, N, *out], [N, K * B]
    counts = b.shape_slice(boxes, 1, 3)  # K, B
    split = b.op("Reshape", [per_box, b.concat([counts, b.shape_slice(per_box, 1)], 0)], like=per_box)
    boxed = b.reduce("ReduceSum", split, [1], keepdims=False)  # [K, N, *out]
    rank = b.info(logits).rank
    linear = b.op("Transpose", [weights], perm=[1, 0, *range(2, rank + 1)], like=logits)
    seed = b.op("Add", [linear, boxed], name="explainrt/grad/seed/weights_boxes", like=logits)
    return logits, seed, b.op("Reshape", [matches, b.shape_slice(boxes, 0, 3)])


def _defended_relu_rules(b: GradientBuilder) -> dict[str, Callable[..., Sequence[object]]]:
    """Relu (and ReLU6: Clip from 0) rules that also need out <= reference to pass the gradient,
    adding each one's reference input and activation output as the reverse pass reaches it
    (Wagner et al., CVPR 2019, Sec. 3.3: the explanation may not raise an activation above the image's)."""
    from explainrt.autodiff.gradients import V, where

    count = itertools.count()

    def bounded(n: Node, g: V) -> V:
        out, index = n.outputs[0], next(count)
        info = b.info(out)
        shape = ["N", *info.shape[1:]] if info.shape else ["N", "C", "h", "w"]
        reference = b.add_input(reference_input(index), info.elem_type, shape)
        b.add_output(relu_output(index), out, info.elem_type, shape)
        return where(n.y[0] <= V(b, reference), g, 0)

    def relu(n: Node, g: Sequence[V | None]) -> Sequence[V | None]:
        return (bounded(n, RULES["Relu"](n, g)[0]),)

    def clip(n: Node, g: Sequence[V | None]) -> Sequence[V | None]:
        standard = RULES["Clip"](n, g)
        low = b.constant_value(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] else None
        if low is None or low.size != 1 or float(low) != 0.0:
            return standard
        return (bounded(n, standard[0]), *standard[1:])

    return {"Relu": relu, "Clip": clip}
