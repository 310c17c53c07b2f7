"""Map heads: a CAM method's maps computed inside the explainable graph.

``add_map_heads`` appends, per method, output ``explainrt.maps.<method>`` ``[N, K, H, W]``: the
method's closed-form weights (``explainrt.kernels.cam_weights``, the formulas the Python path
evaluates too) over each target layer's activations and gradients, then what explainrt's Python
path and pytorch-grad-cam do: weighted channel sum, ReLU, per-map min-max normalisation, bilinear
resize to the input size (cv2's INTER_LINEAR: ONNX Resize, linear, half_pixel), average over
target layers, final min-max normalisation. Any runtime that runs the model (Triton, ONNX
Runtime's C/C++/Java/JS APIs, TensorRT) then returns heatmaps, not raw tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto

from explainrt import kernels
from explainrt.autodiff.builder import GraphBuilder, TensorInfo, shape_name, tensor_infos
from explainrt.autodiff.gradients import V, add_n, where
from explainrt.errors import InvalidInputError, InvalidModelError
from explainrt.export.forward_shapes import shapes_from_the_image
from explainrt.export.spec import (
    BOX_MATCHES_OUTPUT,
    BOX_OBJECTIVES,
    BOX_OBJECTIVES_OUTPUT,
    MAPS_PREFIX,
    METADATA_KEY,
    OBJECTIVES,
    RESOLVED_TARGETS_OUTPUT,
    ExplainableSpec,
    activations_output,
    gradients_output,
    maps_output,
    prune_added_nodes,
    set_metadata,
)
from explainrt.kernels.cam_weights import CAM_EPS, CLOSED_FORMS, NO_CLOSED_FORM, ClosedForm

MAPS_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}
"""Element types a map output may have; uint8 maps are round(255 * map)."""


class _GraphAlgebra:
    """``CamAlgebra`` over graph value handles: each call appends ONNX nodes.

    ``means`` maps gradients [N, K, C, h, w] to their mean over the positions [N, K, C, 1, 1] where the graph
    has it without them (``_mean_of_gradient``)."""

    def __init__(self) -> None:
        self.means: dict[str, V] = {}

    def mean_hw(self, x: V) -> V:
        return self.means[x.name] if x.name in self.means else x.mean([-2, -1])

    def sum_hw(self, x: V) -> V:
        return x.sum([-2, -1])

    def relu(self, x: V) -> V:
        return x.op("Relu")

    def where_nonzero(self, test: V, x: V) -> V:
        return where(test == 0.0, 0.0, x)


TARGET_OBJECTIVES = frozenset({"probability", "weights", *BOX_OBJECTIVES})
"""The objectives of ``explainrt.targets`` objects: a method that weighs a class logit's gradients weighs
theirs in its place (as ``runtime.objective.TargetSession`` runs it)."""


def closed_form(method: str, objective: str | None = None, *, target_objective: bool = False) -> ClosedForm:
    """The closed form of ``method``'s maps; a clear error for unknown methods, methods without one,
    and (given the model's ``objective``) methods that weigh the gradients of another objective.
    ``target_objective``: the objective may also be a target objects' one standing in for the logit
    (``TARGET_OBJECTIVES``), as for the map heads ``TargetSession.maps`` runs."""
    name = method.lower()
    if name in NO_CLOSED_FORM:
        raise InvalidInputError(f"method {name!r} has no map head: {NO_CLOSED_FORM[name]}; map heads exist for "
                                f"{', '.join(CLOSED_FORMS)} (use the Python path for {name!r})")
    if name not in CLOSED_FORMS:
        raise InvalidInputError(f"no map head for {method!r}: map heads exist for the closed-form CAM methods "
                                f"{', '.join(CLOSED_FORMS)}")
    form = CLOSED_FORMS[name]
    if objective is not None and form.objective != objective and not (
            target_objective and form.objective == "logit" and objective in TARGET_OBJECTIVES):
        raise InvalidInputError(f"method {name!r} weighs the gradients of objective {form.objective!r} "
                                f"({OBJECTIVES[form.objective]}), but the model differentiates {objective!r}: "
                                f"export its map head in a model made with objective={form.objective!r}")
    return form


def checked_maps(maps: str | Sequence[str]) -> tuple[str, ...]:
    """Method names for map heads (a comma-separated string or a sequence), lower-cased, each checked."""
    if not isinstance(maps, (str, Sequence)) or any(not isinstance(m, str) for m in ([] if isinstance(maps, str) else maps)):
        raise InvalidInputError(f"maps must be method names (a sequence, or one comma-separated string), got {maps!r}")
    names = [m.strip() for m in maps.split(",")] if isinstance(maps, str) else [m.strip() for m in maps]
    names = [n.lower() for n in names if n]
    for name in names:
        closed_form(name)
    if len(set(names)) != len(names):
        raise InvalidInputError(f"map methods repeat: {names}")
    return tuple(names)


def add_map_heads(model: onnx.ModelProto, maps: str | Sequence[str], maps_only: bool = False,
                  maps_dtype: str = "float32", *, target_objective: bool = False,
                  forward_shapes: bool = True) -> onnx.ModelProto:
    """The explainable ``model`` (changed in place) with a map head per method of ``maps``.

    ``maps_only=True`` leaves as outputs only the original ones, ``explainrt.resolved_targets``
    (the class each map explains) and the maps added now: activations, gradients and earlier maps
    no longer leave the runtime. ``maps_dtype`` is float32, float16 or uint8 (round(255 * map)).
    ``target_objective``: the model differentiates a target objects' objective in place of the logit
    (``closed_form``), for the runtime's maps of target objects. ``forward_shapes``: then every Shape read of a
    forward tensor explainrt added, the heads' and the reverse pass's, comes from the image (``shapes_from_the_image``).
    """
    spec = ExplainableSpec.from_model(model)
    methods = checked_maps(maps)
    if not methods:
        raise InvalidInputError("no map method given (e.g. maps=('gradcam',))")
    if maps_dtype not in MAPS_DTYPES:
        raise InvalidInputError(f"maps_dtype must be one of {', '.join(MAPS_DTYPES)}; got {maps_dtype!r}")
    for method in methods:
        closed_form(method, spec.objective, target_objective=target_objective)
    if spec.maps_only:
        raise InvalidModelError("the model was exported maps-only: it has no activation and gradient outputs to "
                                "add map heads to; add them to the full explainable model")
    existing = set(spec.maps) & set(methods)
    if existing:
        raise InvalidInputError(f"the model already has map heads for {sorted(existing)}")
    if spec.maps and not maps_only and maps_dtype != spec.maps_dtype:
        raise InvalidInputError(f"the model's map heads are {spec.maps_dtype}; new ones must be too (got {maps_dtype})")
    b = GraphBuilder(model)
    layers = [(V(b, activations_output(i)), V(b, gradients_output(i))) for i in range(len(spec.target_layers))]
    for method in methods:
        b.scope = f"explainrt/maps/{method}"
        heatmaps = _method_maps(b, CLOSED_FORMS[method], layers, spec.image_input)
        out = _as_dtype(heatmaps, MAPS_DTYPES[maps_dtype])
        b.add_output(maps_output(method), out.name, MAPS_DTYPES[maps_dtype], ["N", "K", *_input_hw(model, spec)])
    prune_added_nodes(model)  # what a head built and then did not read (a broadcast the MatMul spares)
    if forward_shapes:
        shapes_from_the_image(model, spec.image_input)
    updated = dataclasses.replace(spec, maps=(*spec.maps, *methods), maps_dtype=maps_dtype)
    set_metadata(model, METADATA_KEY, updated.to_json())
    if maps_only:
        keep_maps_only(model, methods)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise InvalidModelError(f"the model with map heads failed ONNX validation: {error}") from error
    return model


def keep_maps_only(model: onnx.ModelProto, methods: Sequence[str]) -> onnx.ModelProto:
    """The explainable ``model`` (changed in place) returning only its original outputs,
    ``explainrt.resolved_targets`` (a box objective's ``explainrt.box_matches`` and ``explainrt.box_objectives``)
    and the maps of ``methods`` (heads it has): the activation and gradient outputs, other maps and every node
    only they need are dropped. ONNX Runtime runs all of a model's nodes whatever is fetched, so a runtime asked
    for maps alone runs this."""
    spec = ExplainableSpec.from_model(model)
    missing = [m for m in methods if m not in spec.maps]
    if missing or not methods:
        raise InvalidInputError(f"the model has map heads for {list(spec.maps)}; maps-only needs some of them, "
                                f"got {list(methods)}")
    wanted = {RESOLVED_TARGETS_OUTPUT, BOX_MATCHES_OUTPUT, BOX_OBJECTIVES_OUTPUT, *(maps_output(m) for m in methods)}
    outputs = [o for o in model.graph.output if not o.name.startswith("explainrt.") or o.name in wanted]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    prune_added_nodes(model)
    kept = tuple(m for m in spec.maps if m in methods)
    set_metadata(model, METADATA_KEY, dataclasses.replace(spec, maps=kept, maps_only=True).to_json())
    return model


def head_only_model(model: onnx.ModelProto, method: str) -> onnx.ModelProto:
    """``method``'s map head as a model of its own: inputs the image (read for its size) and each target
    layer's activations and gradients (float32, as the explainable ``model`` returns them for the
    objective the method weighs), output ``explainrt.maps.<method>`` float32 [N, K, H, W].

    A runtime runs it after the explainable model: an engine explaining with several methods then
    holds the model's weights once, not once per method (a maps-only variant per method is a whole
    copy of the model: 1.6 GB each for VGG-16)."""
    spec = ExplainableSpec.from_model(model)
    form = closed_form(method)
    infos = tensor_infos(model)  # a maps-only model lacks these outputs: their dims are then unknown
    image = next(v for v in model.graph.input if v.name == spec.image_input)

    def float_input(name: str, rank: int) -> onnx.ValueInfoProto:
        info = infos.get(name)
        dims = list(info.shape) if info is not None and info.shape is not None else [None] * rank
        return onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    inputs = [image]
    for index in range(len(spec.target_layers)):
        inputs += [float_input(activations_output(index), 4), float_input(gradients_output(index), 5)]
    graph = onnx.helper.make_graph([], f"explainrt-map-head-{method}", inputs, [])
    head = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    b = GraphBuilder(head)
    b.scope = f"explainrt/maps/{method}"
    layers = [(V(b, activations_output(i)), V(b, gradients_output(i))) for i in range(len(spec.target_layers))]
    maps = _method_maps(b, form, layers, spec.image_input)
    b.add_output(maps_output(method), maps.name, TensorProto.FLOAT, ["N", "K", *_input_hw(model, spec)])
    prune_added_nodes(head)
    try:
        onnx.checker.check_model(head)
    except onnx.checker.ValidationError as error:
        raise InvalidModelError(f"the map head of {method!r} failed ONNX validation: {error}") from error
    return head


def without_maps(model: onnx.ModelProto) -> onnx.ModelProto:
    """The explainable ``model`` (changed in place) without map heads, keeping activations and gradients."""
    spec = ExplainableSpec.from_model(model)
    if spec.maps_only:
        raise InvalidModelError("the model was exported maps-only: its activations and gradients are gone")
    outputs = [o for o in model.graph.output if not o.name.startswith(MAPS_PREFIX)]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    prune_added_nodes(model)
    set_metadata(model, METADATA_KEY, dataclasses.replace(spec, maps=(), maps_dtype="float32").to_json())
    return model


def map_methods(model: onnx.ModelProto) -> list[str]:
    """The methods whose maps ``model`` outputs."""
    return [o.name[len(MAPS_PREFIX):] for o in model.graph.output if o.name.startswith(MAPS_PREFIX)]


def _input_hw(model: onnx.ModelProto, spec: ExplainableSpec) -> list[int | str]:
    value = next(v for v in model.graph.input if v.name == spec.image_input)
    dims = value.type.tensor_type.shape.dim[2:4]
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{axis}") for d, axis in zip(dims, "HW")]


def _method_maps(b: GraphBuilder, form: ClosedForm, layers: list[tuple[V, V]], image: str) -> V:
    """[N, K, H, W] maps of one method: per layer weights, ReLU'd sum, normalise, resize; layer average; normalise.
    One layer resized by static tables is normalised on its small map (``_normalized_resize``)."""
    ops = _GraphAlgebra()
    per_layer = []
    image_hw = (b.info(image).shape or (None,) * 4)[2:4]
    for acts, grads in layers:
        # the layer's C, h, w where they and the image size are static (a dynamic image's layers may declare
        # the grid of the nominal size they were found at)
        shape = b.infos[acts.name].shape if acts.name in b.infos and all(isinstance(d, int) for d in image_hw) else None
        if shape is not None and not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            shape = None
        as_float = _float32(acts)
        a = as_float.unsqueeze([-4])  # [N, 1, C, h, w]: broadcast over the K targets
        g = _float32(grads)  # [N, K, C, h, w]
        source = _mean_of_gradient(b, g, all(isinstance(d, int) and d > 0 for d in image_hw))
        if source is not None:
            ops.means[g.name] = source
        weighted, weights = form.formula(ops, a, g)
        if weighted is a and _per_channel(weights) and shape is not None:
            cams = ops.relu(_channel_sum(b, weights, as_float, shape[1:]))  # type: ignore[arg-type]
        else:
            cams = ops.relu((weights * weighted).sum([-3], keepdims=False))  # [N, K, h, w]
        per_layer.append((_normalized(b, cams), list(shape[2:4]) if shape else []))
    if len(per_layer) == 1 and (tables := _resize_tables(b, image, per_layer[0][1])) is not None:
        return _normalized_resize(b, per_layer[0][0], *tables)
    resized = [_resize_like_image(b, maps, image, grid) for maps, grid in per_layer]
    combined = resized[0] if len(resized) == 1 else add_n([ops.relu(m) for m in resized]) / float(len(resized))
    return _normalized(b, combined)


POOLINGS = {"ReduceMean", "ReduceSum", "GlobalAveragePool"}
"""Forward operators whose gradient rule spreads one value per channel over the positions (by an Expand)."""


def _mean_of_gradient(b: GraphBuilder, grads: V, static_image: bool) -> V | None:
    """The mean over the positions, [N, K, C, 1, 1], of gradients [N, K, C, h, w] that are the explainable
    model's gradient output of a layer, computed without the gradient itself where a term of it allows: the
    gradient is the Transpose ([K, N] -> [N, K]) of a layer's gradient [K, N, C, h, w], one term per reader
    (their ONNX Sum, ``explainrt/grad/<layer>``, where several). A pooling's term (a classifier's global
    average pool) copies one value per channel over the positions (``_expanded_value``); a Conv's term has
    the closed-form mean ``_conv_input_mean`` (window sums times the weight: a fraction of the input
    gradient's work). Other terms are averaged as they are. None when no term has a shortcut, or the
    gradient is not such an output. A head reading this mean leaves the shortcut terms (and, maps-only,
    the gradient output) out of the runtime's work. ``static_image``: the image size is fixed, so the
    Conv terms' sizes in the shape information are the run-time ones (else only the pooling shortcut)."""
    node = b.producer(grads.name)
    while node is not None and node.op_type == "Identity":
        node = b.producer(node.input[0])
    if node is None or node.op_type != "Transpose" or _attribute(node, "perm") != [1, 0, 2, 3, 4] \
            or grads.info.shape is None:
        return None
    total = b.producer(node.input[0])
    terms = list(total.input) if total is not None and total.op_type == "Sum" and \
        total.name.startswith("explainrt/grad/") else [node.input[0]]
    shortcuts = [_expanded_value(b, term) or (_conv_input_mean(b, term) if static_image else None) for term in terms]
    if not any(shortcuts):
        return None
    means = [mean or b.reduce("ReduceMean", term, [-2, -1]) for term, mean in zip(terms, shortcuts)]
    summed = means[0] if len(means) == 1 else b.op("Sum", means)
    source = b.op("Transpose", [summed], perm=[1, 0, 2, 3, 4])
    return V(b, source, TensorInfo(grads.dtype, (*grads.info.shape[:3], 1, 1)))


def _expanded_value(b: GraphBuilder, term: str) -> str | None:
    """The [K, N, C, 1, 1] value a pooling's gradient rule copies over the layer's positions with the Expand
    that outputs ``term`` (its size taken from the pooled tensor's shape), else None."""
    expand = b.producer(term)
    pooling = _pooling_of(b, expand) if expand is not None and expand.op_type == "Expand" else None
    sizes = b.producer(expand.input[1]) if pooling is not None else None  # type: ignore[union-attr]
    shape = b.producer(sizes.input[-1]) if sizes is not None and sizes.op_type == "Concat" else None
    # the pooled tensor's Shape, or what ``shapes_from_the_image`` put in its place under the name ``GraphBuilder.shape``
    # gave that Shape: the same value from the image's batch and constants (an Expand reads it: never a -1 batch)
    if shape is None or not ((shape.op_type == "Shape" and shape.input[0] == pooling.input[0])  # type: ignore[union-attr]
                             or (shape.op_type == "Identity" and shape.output[0] == shape_name(pooling.input[0]))):  # type: ignore[union-attr]
        return None
    return expand.input[0]  # type: ignore[union-attr]


def _conv_input_mean(b: GraphBuilder, term: str) -> str | None:
    """The mean over the input positions, [K, N, C, 1, 1], of the input gradient ``term`` that a Conv's rule built
    (2-D, one group, constant weight, static sizes, explicit pads), from its output gradients ``gy``
    [K*N, O, h', w'] alone: ``mean_c = sum_{o, i, j} w[o, c, i, j] S[o, i, j] / (h w)``, where ``S[o, i, j]``
    sums ``gy[o]`` over the output positions whose window tap (i, j) falls inside the input, i.e.
    ``S = rows @ gy @ columns`` with 0/1 tables of which taps of which output rows (columns) land inside.
    Else None."""
    node = b.producer(term)
    scope = node.name.rpartition("/")[0] if node is not None else ""
    if node is None or not scope.startswith("explainrt/grad/"):
        return None
    name = scope[len("explainrt/grad/"):]  # the driver scopes a rule by its node's name, else its first output
    named = [n for n in b.graph.node if (n.name or n.output[0]) == name and not n.name.startswith("explainrt/")]
    if len(named) != 1 or named[0].op_type != "Conv":  # the ONNX checker allows repeated names (ONNX Runtime not)
        return None
    conv = named[0]
    merged = _merged_output_gradient(b, node, scope)
    weight = b.weight_value(conv.input[1])
    x_info, y_info = b.infos.get(conv.input[0]), b.infos.get(conv.output[0])
    if merged is None or weight is None or weight.ndim != 4 or x_info is None or y_info is None \
            or int(_attribute(conv, "group") or 1) != 1 or _attribute(conv, "auto_pad") not in (None, b"NOTSET"):
        return None
    sizes = [*(x_info.shape or ())[2:], *(y_info.shape or ())[2:]]
    if len(sizes) != 4 or not all(isinstance(d, int) and d > 0 for d in sizes):
        return None
    height, width, out_height, out_width = sizes
    channels_out, channels, kernel_h, kernel_w = weight.shape
    strides = _attribute(conv, "strides") or [1, 1]
    dilations = _attribute(conv, "dilations") or [1, 1]
    pads = _attribute(conv, "pads") or [0, 0, 0, 0]
    rows = _taps_inside(height, out_height, kernel_h, strides[0], dilations[0], pads[0])  # type: ignore[index]
    columns = _taps_inside(width, out_width, kernel_w, strides[1], dilations[1], pads[1]).T  # type: ignore[index]
    dtype = onnx.helper.np_dtype_to_tensor_dtype(weight.dtype)
    per_tap = weight.transpose(0, 2, 3, 1).reshape(channels_out * kernel_h * kernel_w, channels) / (height * width)
    across = b.op("MatMul", [merged, b.constant(columns, dtype=dtype)])  # [K*N, O, h', kw]
    taps = b.op("MatMul", [b.constant(rows, dtype=dtype), across])  # [K*N, O, kh, kw]
    flat = b.op("Reshape", [taps, b.ints([-1, channels_out * kernel_h * kernel_w])])
    mean = b.op("MatMul", [flat, b.constant(per_tap, dtype=dtype)])  # [K*N, C]
    # [K*N, C] -> [K, N, C, 1, 1], N read from the layer's input: a shape read from the output gradients would keep
    # them whole where only ``merged`` is needed (a windowed detector branch then pads them back for nothing)
    shape = b.concat([b.ints([-1]), b.shape_slice(conv.input[0], 0, 1), b.ints([channels, 1, 1])], 0)
    return b.op("Reshape", [mean, shape])


def _taps_inside(size: int, out_size: int, kernel: int, stride: int, dilation: int, pad: int) -> np.ndarray:
    """[kernel, out_size] 0/1: whether tap i of output position y's window, input position
    ``y * stride - pad + i * dilation``, lies inside the input's ``size`` positions."""
    positions = np.arange(out_size)[None, :] * stride - pad + np.arange(kernel)[:, None] * dilation
    return ((positions >= 0) & (positions < size)).astype(np.float32)


def _merged_output_gradient(b: GraphBuilder, node: onnx.NodeProto, scope: str) -> str | None:
    """The Conv rule's output gradients merged to [K*N, O, h', w'] (``merge_seeds``, named ``<scope>/Reshape``),
    found from the rule's last node back through its Slice / Pad / Conv / ConvTranspose; None if not there."""
    while node is not None and node.name.startswith(scope + "/"):
        if node.op_type == "Reshape" and node.name == f"{scope}/Reshape":
            return node.output[0]
        node = b.producer(node.input[0])  # type: ignore[assignment]
    return None


def _pooling_of(b: GraphBuilder, expand: onnx.NodeProto) -> onnx.NodeProto | None:
    """The forward node pooling a rank-4 tensor over its last two axes whose gradient rule built
    ``expand`` (its scope names it), else None."""
    prefix, _, tail = expand.name.rpartition("/")
    if not prefix.startswith("explainrt/grad/") or tail != "Expand":
        return None
    name = prefix[len("explainrt/grad/"):]
    pooling = next((n for n in b.graph.node if n.name == name and n.op_type in POOLINGS), None)
    if pooling is None or b.infos.get(pooling.input[0]) is None or b.info(pooling.input[0]).rank != 4:
        return None
    if pooling.op_type == "GlobalAveragePool":
        return pooling
    axes = _attribute(pooling, "axes")
    if axes is None and len(pooling.input) > 1 and pooling.input[1]:
        constant = b.constant_value(pooling.input[1])
        axes = None if constant is None else constant.tolist()
    return pooling if axes is not None and sorted(a % 4 for a in axes) == [2, 3] else None


def _attribute(node: onnx.NodeProto, name: str) -> object:
    """The value of ``node``'s attribute ``name`` (a list for ints), None when it has none."""
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return list(value) if attribute.type == onnx.AttributeProto.INTS else value
    return None


def _per_channel(weights: V) -> bool:
    """Whether the weights are one per channel, [N, K, C, 1, 1], as far as the graph knows."""
    shape = weights.info.shape
    return shape is not None and len(shape) == 5 and tuple(shape[-2:]) == (1, 1)


def _channel_sum(b: GraphBuilder, weights: V, acts: V, chw: Sequence[int]) -> V:
    """sum_c weights[n, k, c] * acts[n, c] as one batched MatMul, [N, K, h, w] (static C, h, w): a
    fraction of the broadcast product's [N, K, C, h, w] work and memory."""
    channels, height, width = chw
    per_target = b.op("Reshape", [weights.name, b.ints([0, 0, channels])])  # [N, K, C]
    positions = b.op("Reshape", [acts.name, b.ints([0, channels, height * width])])  # [N, C, h*w]
    summed = b.op("MatMul", [per_target, positions])  # [N, K, h*w]
    cams = b.op("Reshape", [summed, b.ints([0, 0, height, width])])
    return V(b, cams, TensorInfo(TensorProto.FLOAT, (weights.info.shape[0], weights.info.shape[1], height, width)))  # type: ignore[index]


def _float32(value: V) -> V:
    return value if value.dtype == TensorProto.FLOAT else value.cast(TensorProto.FLOAT)


def _normalized(b: GraphBuilder, maps: V) -> V:
    """pytorch-grad-cam's ``scale_cam_image`` per map: (x - min) / (max(x - min) + 1e-7)."""
    shifted = maps - V(b, b.reduce("ReduceMin", maps.name, [-2, -1]))
    return shifted / (V(b, b.reduce("ReduceMax", shifted.name, [-2, -1])) + CAM_EPS)


def _resize_tables(b: GraphBuilder, image: str, grid: Sequence[object]) -> tuple[np.ndarray, np.ndarray] | None:
    """cv2.resize(INTER_LINEAR)'s interpolation matrices from a layer's ``grid`` (h, w as the graph knows
    them) to the image's [H, W] (``kernels.resize_matrix``, the Python path's table): rows [H, h] and
    columns [w, W]; None unless both sizes are static."""
    sizes = [*grid, *(b.info(image).shape or (None,) * 4)[2:4]]
    if len(sizes) != 4 or not all(isinstance(d, int) and d > 0 for d in sizes):
        return None
    h, w, height, width = sizes
    return kernels.resize_matrix(h, height), kernels.resize_matrix(w, width).T  # type: ignore[arg-type]


def _resize_like_image(b: GraphBuilder, maps: V, image: str, grid: Sequence[object]) -> V:
    """Bilinear resize of [N, K, h, w] (``grid``: h, w as the graph knows them) to the image's [H, W] as
    cv2.resize(INTER_LINEAR) does it. Where both sizes are static, two MatMuls with the interpolation
    matrices (``_resize_tables``): no shape arithmetic at run time and a fraction of ONNX Runtime's Resize
    kernel time; otherwise a Resize to the image's run-time size."""
    tables = _resize_tables(b, image, grid)
    if tables is not None:
        return _resized_by(b, maps, *tables)
    sizes = b.concat([b.shape_slice(maps.name, 0, 2), b.shape_slice(image, 2, 4)], 0)
    resized = b.op("Resize", [maps.name, "", "", sizes], mode="linear", coordinate_transformation_mode="half_pixel")
    b.infos[resized] = TensorInfo(maps.dtype, None)
    return V(b, resized)


def _resized_by(b: GraphBuilder, maps: V, rows: np.ndarray, columns: np.ndarray) -> V:
    """``rows @ maps @ columns`` for maps [N, K, h, w]: two MatMuls with constant tables, the second one by groups of
    output rows (``grouped_rows``) where that saves work."""
    across = b.op("MatMul", [maps.name, b.constant(columns, dtype=TensorProto.FLOAT)])  # [N, K, h, W]
    grouped = grouped_rows(rows) if rows.shape[1] >= GROUPED_ROWS_FROM else None
    if grouped is None:
        resized = b.op("MatMul", [b.constant(rows, dtype=TensorProto.FLOAT), across])  # [N, K, H, W]
    else:
        sources, weights = grouped
        near = b.op("Gather", [across, b.constant(sources, dtype=TensorProto.INT64)], axis=-2)  # [N, K, h, 3, W]
        spread = b.op("MatMul", [b.constant(weights, dtype=TensorProto.FLOAT), near])  # [N, K, h, H / h, W]
        resized = b.op("Reshape", [spread, b.ints([0, 0, rows.shape[0], -1])])
    b.infos[resized] = TensorInfo(TensorProto.FLOAT, None)
    return V(b, resized)


GROUPED_ROWS_FROM = 16
"""Source rows from which ``grouped_rows`` pays for its Gather (ONNX Runtime, CPU: slower for 14 -> 224, 1.1x faster
for 20 -> 640, 1.9x for YOLOv8's 80 -> 640)."""


def grouped_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """An interpolation matrix [H, h] with H = f h whose output rows f j ... f j + f - 1 read only input rows j - 1,
    j, j + 1 (an integer upscale: cv2's bilinear) as ``sources`` [h, 3] (those rows, clamped to the grid) and
    ``weights`` [h, f, 3]: ``table @ x`` is then ``weights @ x[sources]`` by groups, 3 products per output instead
    of h. None for a table of another form."""
    height, size = table.shape
    if height % size:
        return None
    factor = height // size
    sources = np.clip(np.arange(size)[:, None] + np.arange(-1, 2)[None, :], 0, size - 1)
    weights = np.zeros((size, factor, 3), dtype=np.float32)
    for row, column in zip(*np.nonzero(table)):
        group = row // factor
        if not group - 1 <= column <= group + 1:
            return None
        weights[group, row % factor, column - group + 1] = table[row, column]  # a clamped copy's weight stays 0
    return sources.astype(np.int64), weights


def _normalized_resize(b: GraphBuilder, maps: V, rows: np.ndarray, columns: np.ndarray) -> V:
    """``_normalized(resize(maps))`` with the normalisation done on the small maps [N, K, h, w]: a resize's rows
    sum to 1, so it commutes with ``x - min`` and ``x / scale``; and its min and max over [H, W] lie among
    ``extreme_rows`` x ``extreme_rows`` of the tables (a few dozen values), not the H * W of the full map."""
    keep_rows, keep_columns = extreme_rows(rows), extreme_rows(columns.T)
    if keep_rows is None or keep_columns is None:
        return _normalized(b, _resized_by(b, maps, rows, columns))
    extremes = _resized_by(b, maps, rows[keep_rows], columns[:, keep_columns])  # [N, K, r, c]
    low = V(b, b.reduce("ReduceMin", extremes.name, [-2, -1]))
    high = V(b, b.reduce("ReduceMax", (extremes - low).name, [-2, -1]))
    resized = _resized_by(b, (maps - low) / (high + CAM_EPS), rows, columns)
    # the MatMuls' rounding leaves values like -1e-13 where the full-size normalisation gave 0: kept in [0, 1]
    bounds = [b.constant(0.0, dtype=TensorProto.FLOAT), b.constant(1.0, dtype=TensorProto.FLOAT)]
    return V(b, b.op("Clip", [resized.name, *bounds]), TensorInfo(TensorProto.FLOAT, None))


def extreme_rows(table: np.ndarray) -> np.ndarray | None:
    """Rows of an interpolation matrix [out, in] (each row a convex combination of at most two inputs) at
    which ``table @ x`` takes its smallest and largest value for every ``x``: rows mixing the same inputs are
    ``x[i] + w (x[j] - x[i])``, extreme at their smallest and largest weight ``w``; a product of two tables
    (a bilinear map) is extreme at pairs of such rows. None for a table of another form."""
    if np.any(table < 0) or not np.allclose(table.sum(axis=1), 1.0, atol=1e-6):
        return None
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, row in enumerate(table):
        groups.setdefault(tuple(np.flatnonzero(row)), []).append(index)
    if any(len(inputs) > 2 for inputs in groups):
        return None
    kept = set()
    for inputs, members in groups.items():
        weights = table[members, inputs[0]]
        kept.update((members[int(np.argmin(weights))], members[int(np.argmax(weights))]))
    return np.array(sorted(kept))


def _as_dtype(maps: V, dtype: int) -> V:
    """The maps in the output element type: uint8 maps are round(255 * map)."""
    if dtype == TensorProto.FLOAT:
        return maps
    if dtype == TensorProto.UINT8:
        return (maps * 255.0).op("Round").cast(dtype)
    return maps.cast(dtype)
