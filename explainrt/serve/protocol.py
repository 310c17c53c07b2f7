"""What the server's endpoints take and answer, shared by ``explainrt serve`` (``app.py``) and the KServe
adapter (``kserve_model.py``): V1 ``:predict`` / ``:explain`` and V2 ``infer`` from a decoded request to its
answer, the targets (``parameters.targets`` and the ``explainrt.targets`` tensor) and the V2 model metadata.

A front-end decodes the request (its own HTTP framing), calls ``v1_predict`` / ``v1_explain`` / ``v2_infer``
with a ``ServedModel`` and writes the answer; a bad request is an ``InvalidInputError`` (or
``InvalidTargetError``, ``RequestTooLargeError``) naming the problem, which each front-end maps to a 4xx.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from explainrt.errors import InvalidInputError, InvalidTargetError, RequestTooLargeError
from explainrt.export.spec import (
    RESOLVED_TARGETS_OUTPUT,
    activations_output,
    gradients_output,
)
from explainrt.methods import METHODS
from explainrt.numerics import class_scores, softmax
from explainrt.serve import codec
from explainrt.serve.codec import Limits, V2Tensor
from explainrt.serve.models import (
    Job,
    ServedModel,
    explain_key,
    layers_key,
    predict_key,
    preprocessed_shape,
)
from explainrt.targets import from_json
from explainrt.validation import check_class_range, checked_int

MAPS_OUTPUT = "explainrt.maps"
TARGETS_TENSOR = "explainrt.targets"
OBJECTIVE_OUTPUT = "explainrt.objective"
"""V2 output FP32 [N] ([N, K]): each instance's target objective when parameters.targets holds explainrt.targets
objects."""
TOP_K = 5
RESERVED_PARAMETERS = ("method", "targets", "return", "normalize", "caption", "binary_data_output")
"""V1/V2 parameters the server reads itself; every other parameter is an option of the method."""
RETURNS = ("overlay", "map")


@dataclass(frozen=True)
class ServeConfig:
    """How a server batches and what it accepts."""

    max_batch: int = 16
    max_wait: float = 0.005  # seconds a request may wait for others to join its batch
    max_queue: int = 512  # images waiting per model before requests get 503
    limits: Limits = field(default_factory=Limits)


Gone = Callable[[], Awaitable[Any]] | None
"""Returns when the request's client has disconnected (its work is then dropped); None where unknown."""


# -- V1 ------------------------------------------------------------------------------------------------------
async def v1_predict(model: ServedModel, body: Any, limits: Limits) -> dict[str, Any]:
    """``:predict``: per instance the top class and the top ``top_k`` (index, label, probability)."""
    parameters = request_parameters(body)
    top_k = checked_int("parameter top_k", parameters.get("top_k", TOP_K), 1, model.num_classes)
    images = await asyncio.to_thread(codec.decode_instances, body, limits)
    result = await model.submit(predict_key(raw=True), Job(images))
    return {"model_name": model.name, "predictions": predictions(model, result["logits"], top_k)}


async def v1_explain(model: ServedModel, body: Any, limits: Limits, gone: Gone = None) -> dict[str, Any]:
    """``:explain``: per instance the method, its target(s) and what parameter ``return`` asks for (overlays,
    maps); the top 5 predictions (class targets) and the timings."""
    parameters = request_parameters(body)
    method, options, normalize = codec.method_parameters(parameters, RESERVED_PARAMETERS)
    returns = _returns(parameters.get("return", ["overlay"]))
    images = await asyncio.to_thread(codec.decode_instances, body, limits)
    targets = instance_targets(parameters.get("targets"), len(images), model.num_classes)
    objects = targets.dtype == object  # then logits hold each instance's objective, not class scores
    tick = time.perf_counter()
    result = await model.submit(explain_key(True, method, options, normalize, objects, _per_image(targets)),
                                Job(images, targets, overlays="overlay" in returns,
                                    captions=_flag(parameters, "caption", False)), gone)
    waited = time.perf_counter() - tick
    encoded = await asyncio.to_thread(_explanations, model, method, result, returns, objects)
    return {"model_name": model.name, "predictions": [] if objects else predictions(model, result["logits"], TOP_K),
            "explanations": encoded, "timings": {**result["timings"], "request": waited}}


def request_parameters(body: Any) -> dict[str, Any]:
    """The request's ``parameters`` object (empty when absent)."""
    parameters = codec.json_object(body, "the request body").get("parameters", {})
    return codec.json_object(parameters, '"parameters"')


def _flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInputError(f"parameter {name} must be true or false, got {value!r}")
    return value


def _returns(value: Any) -> tuple[str, ...]:
    chosen = (value,) if isinstance(value, str) else value
    if not isinstance(chosen, list | tuple) or not chosen or any(item not in RETURNS for item in chosen):
        raise InvalidInputError(f"parameter return must be one or more of {', '.join(RETURNS)}, got {value!r}")
    return tuple(chosen)


def instance_targets(value: Any, count: int, classes: int) -> np.ndarray:
    """Targets: None (top class), one class for all, or one per instance; -k = the k-th most likely; or
    explanation targets (``explainrt.targets.from_json``), one for all or one per instance (an object array);
    or a list of K of these per instance (all of one length K): [count, K]. Any of these may come as JSON text
    (a string that starts with ``[`` or ``{``): the Open Inference Protocol's parameters are scalars."""
    if value is None:
        return np.full(count, -1, dtype=np.int64)
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"parameter targets is not valid JSON text: {error.msg} at column "
                                    f"{error.colno}") from None
    rows = [isinstance(item, list) for item in value] if isinstance(value, list) else [False]
    if any(rows):
        if not all(rows):
            raise InvalidInputError(f"parameter targets must be one target per instance or one list of K targets per "
                                    f"instance, not both: got {value!r}")
        lengths = sorted({len(row) for row in value})
        if len(value) != count or len(lengths) != 1 or lengths[0] == 0:
            raise InvalidInputError(f"parameter targets as lists of K targets needs one list per instance ({count}), "
                                    f"all of one length K >= 1 (maps are [N, K, H, W]); got {len(value)} lists of "
                                    f"lengths {', '.join(map(str, lengths))}")
        columns = [instance_targets([row[k] for row in value], count, classes) for k in range(lengths[0])]
        kind = object if any(column.dtype == object for column in columns) else np.int64
        return np.stack([column.astype(kind) for column in columns], axis=1)
    values = [value] * count if not isinstance(value, list) else value
    if any(isinstance(v, (str, dict)) for v in values):
        if len(values) != count:
            raise InvalidInputError(f"parameter targets must be one target or {count} (one per instance), got "
                                    f"{len(values)}")
        objects = np.empty(count, dtype=object)
        objects[:] = [from_json(v) for v in values]
        return objects
    if len(values) != count or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise InvalidInputError(f"parameter targets must be one class index or {count} (one per instance), got {value!r}")
    check_class_range(values, classes)
    return np.asarray(values, dtype=np.int64)


def _per_image(targets: np.ndarray) -> int:
    """K for targets [N, K] (K per instance), 0 for one per instance: requests of different K batch apart."""
    return targets.shape[1] if targets.ndim == 2 else 0


def _class(model: ServedModel, index: int, probability: float) -> dict[str, Any]:
    labels = model.labels
    return {"index": int(index), "label": labels[index] if labels else None, "probability": float(probability)}


def predictions(model: ServedModel, logits: np.ndarray, top_k: int) -> list[dict[str, Any]]:
    """Per image its top class and the top ``top_k`` classes (index, label, softmax probability)."""
    logits = class_scores(logits)
    probabilities = softmax(logits)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    return [{**_class(model, int(row[0]), p[row[0]]), "top_k": [_class(model, int(c), p[c]) for c in row]}
            for row, p in zip(order, probabilities, strict=True)]


def _explanations(model: ServedModel, method: str, result: dict[str, Any], returns: tuple[str, ...],
                  objects: bool = False) -> list[dict[str, Any]]:
    """Per instance: the method, its target (with ``objects``, the class the target is about and its
    objective's score) and what ``returns`` asks for; with K targets per instance, ``targets``: K of these."""
    probabilities = softmax(class_scores(result["logits"]))
    encoded = []
    for index, row in enumerate(result["targets"]):
        parts = []
        for k, target in enumerate(np.atleast_1d(row)):
            at = (index, k) if np.ndim(row) else (index,)
            if objects:
                label = model.labels[target] if model.labels and 0 <= target < len(model.labels) else None
                described = {"index": int(target), "label": label, "score": float(result["logits"][index, k])}
            else:
                described = _class(model, int(target), probabilities[index, target])
            part: dict[str, Any] = {"target": described}
            if "overlay" in returns:
                overlays = result["overlays"]
                part["overlay"] = {"b64": codec.png_b64(overlays[at])} if overlays is not None else None
            if "map" in returns:
                part["map"] = np.round(result["maps"][at], 5).tolist()
            parts.append(part)
        item: dict[str, Any] = {"method": method, **(parts[0] if np.ndim(row) == 0 else {"targets": parts})}
        if result["notes"][index]:
            item["note"] = result["notes"][index]
        small = {key: values[index].tolist() for key, values in result["extras"].items() if values[index].size <= 64}
        if small:
            item["extras"] = small
        encoded.append(item)
    return encoded


# -- V2 ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """One requested V2 output: its name, whether it comes as binary data, and (maps) its format."""

    name: str
    binary: bool
    format: str = "FP32"


async def v2_infer(model: ServedModel, tensors: dict[str, V2Tensor], parameters: dict[str, Any], outputs: Any,
                   limits: Limits, gone: Gone = None) -> list[tuple[Output, np.ndarray]]:
    """V2 ``infer`` from its decoded inputs, ``parameters`` and ``outputs`` (the request's list of
    ``{"name", "parameters"}``, or None for the defaults): each requested output with its array (maps already in
    their format: object arrays of PNG bytes for PNG and OVERLAY)."""
    images, raw, targets = _v2_images(model, tensors)
    if len(images) > limits.max_instances:
        raise RequestTooLargeError(f"{len(images)} images exceed the limit of {limits.max_instances} per "
                                   "request (--max-images)")
    if parameters.get("targets") is not None:  # the V1 JSON forms: class indices or explainrt.targets objects
        if TARGETS_TENSOR in tensors:
            raise InvalidInputError(f"give targets either as input {TARGETS_TENSOR!r} or as parameters.targets, "
                                    "not both")
        targets = instance_targets(parameters["targets"], len(images), model.num_classes)
    objects = targets.dtype == object  # the explain result's logits are then each instance's objective
    requested = _v2_outputs(model, outputs, "method" in parameters, parameters, objects)
    wanted = [output.name for output in requested]
    arrays: dict[str, np.ndarray] = {}
    logits_name = model.explainer.spec.logits
    normalize = True
    overlays = _overlay_requested(requested, raw, model.explainer.spec.image_input)
    if MAPS_OUTPUT in wanted or RESOLVED_TARGETS_OUTPUT in wanted or OBJECTIVE_OUTPUT in wanted:
        method, options, normalize = codec.method_parameters(parameters, RESERVED_PARAMETERS)
        job = Job(images, targets, overlays=overlays, captions=_flag(parameters, "caption", False))
        result = await model.submit(explain_key(raw, method, options, normalize, objects, _per_image(targets)), job,
                                    gone)
        arrays.update({MAPS_OUTPUT: result["overlays"] if overlays else result["maps"],
                       RESOLVED_TARGETS_OUTPUT: result["targets"]})
        objective = result["logits"] if targets.ndim == 2 else result["logits"][:, 0]
        arrays.update({OBJECTIVE_OUTPUT: objective} if objects else {logits_name: result["logits"]})
    if any(output.startswith(("explainrt.activations.", "explainrt.gradients.")) for output in wanted):
        if objects:
            raise InvalidTargetError("outputs explainrt.activations.* / explainrt.gradients.* differentiate class "
                                     "indices; explainrt.targets objects are explained through explainrt.maps")
        result = await model.submit(layers_key(raw), Job(images, targets))
        arrays.update({f"explainrt.{key}": value for key, value in result.items() if "." in key})
        arrays.setdefault(logits_name, result["logits"])
        resolved = result["resolved_targets"]
        arrays.setdefault(RESOLVED_TARGETS_OUTPUT, resolved if targets.ndim == 2 else resolved[:, 0])
    if logits_name not in arrays:
        arrays[logits_name] = (await model.submit(predict_key(raw), Job(images)))["logits"]

    def encode() -> list[tuple[Output, np.ndarray]]:
        return [(output, _encoded_maps(arrays[output.name], output.format, normalize)
                 if output.name == MAPS_OUTPUT else arrays[output.name]) for output in requested]

    return await asyncio.to_thread(encode)


def _v2_images(model: ServedModel, tensors: dict[str, V2Tensor]) -> tuple[Any, bool, np.ndarray]:
    """The image batch (uint8 [N, H, W, 3] as raw images, or float32 in the model's own layout: [N, C, H, W], or
    [N, H, W, C] for a channels-last model) and per-image targets."""
    input_name = model.explainer.spec.image_input
    unknown = sorted(set(tensors) - {input_name, TARGETS_TENSOR})
    if unknown or input_name not in tensors:
        raise InvalidInputError(f"unknown input(s) {unknown or 'none'}: model {model.name!r} takes {input_name!r} "
                                f"(UINT8 [N, H, W, 3] images or FP32 {preprocessed_shape(model.explainer)} "
                                "preprocessed) and optionally "
                                f"{TARGETS_TENSOR!r} (INT64 [N] or [N, K])")
    image = tensors[input_name]
    form = model.explainer.input_form  # FP32 tensors come in the model's own layout, as the Explainer takes them
    expected = preprocessed_shape(model.explainer)
    if image.datatype == "UINT8" and image.array.ndim == 4 and image.array.shape[3] == 3:
        images: Any = list(image.array)
        raw = True
    elif image.datatype == "FP32" and image.array.ndim == 4:
        images, raw = image.array, False
        fixed = [(got, want) for got, want in zip(image.array.shape[1:], form.dims[1:]) if isinstance(want, int) and want > 0]
        if any(got != want for got, want in fixed):
            raise InvalidInputError(f"input {input_name!r} has shape {list(image.array.shape)}; FP32 input must be "
                                    f"{expected}")
    else:
        raise InvalidInputError(f"input {input_name!r} is {image.datatype} {list(image.array.shape)}; expected UINT8 "
                                f"[N, H, W, 3] images or FP32 {expected} preprocessed input")
    count = len(images)
    targets = np.full(count, -1, dtype=np.int64)
    if TARGETS_TENSOR in tensors:
        given = tensors[TARGETS_TENSOR]
        shape = given.array.shape
        if given.datatype not in ("INT64", "INT32") or not (given.array.size == count or (
                len(shape) == 2 and shape[0] == count and shape[1] >= 1)):
            raise InvalidInputError(f"input {TARGETS_TENSOR!r} must be INT64 [{count}] (one class per image) or "
                                    f"[{count}, K] (K classes per image), got {given.datatype} {list(shape)}")
        many = len(shape) == 2 and given.array.size != count  # [N, K]; [N, 1] stays one class per image
        values = given.array.tolist() if many else given.array.ravel().tolist()
        targets = instance_targets(values, count, model.num_classes)
    return images, raw, targets


def _output_names(model: ServedModel) -> list[str]:
    layers = len(model.explainer.spec.target_layers)
    return [model.explainer.spec.logits, MAPS_OUTPUT, RESOLVED_TARGETS_OUTPUT, OBJECTIVE_OUTPUT,
            *(name for i in range(layers) for name in (activations_output(i), gradients_output(i)))]


def _v2_outputs(model: ServedModel, requested: Any, explaining: bool, parameters: dict[str, Any],
                objects: bool = False) -> list[Output]:
    """Requested outputs (default: the logits, plus the maps and resolved targets when a method is given, and
    with ``objects`` (explainrt.targets objects as targets) each instance's objective ``OBJECTIVE_OUTPUT``).

    Binary tensor extension: an output's parameter ``binary_data`` (default: the request's parameter
    ``binary_data_output``, else false); the maps' parameter ``format`` is one of ``codec.V2_MAP_FORMATS``.
    """
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInputError(f"parameter binary_data_output must be true or false, got {binary_default!r}")
    if requested is None:
        base = [model.explainer.spec.logits]
        names = base + [MAPS_OUTPUT, RESOLVED_TARGETS_OUTPUT] if explaining or objects else base
        names += [OBJECTIVE_OUTPUT] if objects else []
        return [Output(name, binary_default) for name in names]
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
        raise InvalidInputError('"outputs" must be a list of {"name": ...} objects')
    known = _output_names(model)
    unknown = [o["name"] for o in requested if o["name"] not in known]
    if unknown:
        raise InvalidInputError(f"unknown output(s) {unknown}; model {model.name!r} has {known}")
    outputs = []
    for item in requested:
        options = item.get("parameters") or {}
        if not isinstance(options, dict):
            raise InvalidInputError(f"output {item['name']!r}: parameters must be an object")
        binary = options.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidInputError(f"output {item['name']!r}: binary_data must be true or false, got {binary!r}")
        form = options.get("format", "FP32")
        if form != "FP32" and item["name"] != MAPS_OUTPUT:
            raise InvalidInputError(f"output {item['name']!r} takes no format (only {MAPS_OUTPUT!r} does)")
        if not isinstance(form, str) or form not in codec.V2_MAP_FORMATS:
            raise InvalidInputError(f"output {MAPS_OUTPUT!r}: format must be one of {', '.join(codec.V2_MAP_FORMATS)}, "
                                    f"got {form!r}")
        outputs.append(Output(item["name"], binary, form))
    return outputs


def _overlay_requested(requested: list[Output], raw: bool, input_name: str) -> bool:
    """Whether the maps are asked for as OVERLAY, which draws them over the original images: refused (400) for
    FP32 preprocessed input, which does not carry them."""
    overlay = any(output.name == MAPS_OUTPUT and output.format == codec.OVERLAY_FORMAT for output in requested)
    if overlay and not raw:
        raise InvalidInputError(f"output {MAPS_OUTPUT!r} format {codec.OVERLAY_FORMAT} draws each map over its "
                                f"original image, but input {input_name!r} is FP32 preprocessed data, which has none: "
                                "send the images as UINT8 [N, H, W, 3] (or ask for format FP32, FP16, UINT8 or PNG)")
    return overlay


def _encoded_maps(array: np.ndarray, form: str, normalize: bool) -> np.ndarray:
    """The maps output in ``form``: for OVERLAY ``array`` holds the overlays (uint8 [N, (K,) H, W, 3]), one PNG
    each; maps [N, K, H, W] (K targets per instance) give PNG tensors [N, K]."""
    if form == codec.OVERLAY_FORMAT:
        return codec.encode_pngs(array.reshape(-1, *array.shape[-3:])).reshape(array.shape[:-3])
    encoded = codec.encode_maps(array.reshape(-1, *array.shape[-2:]), form, normalize)
    return encoded.reshape(array.shape[:-2] if encoded.dtype == object else array.shape)


# -- V2 metadata ---------------------------------------------------------------------------------------------
def metadata_tensors(model: ServedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The V2 metadata's inputs and outputs ({name, datatype, shape}, -1 for a size known per request) as requests
    and answers with one target per instance have them; ``k_target_shapes`` gives those that gain a K axis."""
    spec = model.explainer.spec
    form = model.explainer.input_form  # the image input in the model's own layout ([N, H, W, C] channels-last)
    height, width = _map_size(model)
    explained = spec.output_shape or (spec.num_classes,)  # the explained output's axes after N
    outputs = [{"name": spec.logits, "datatype": "FP32", "shape": [-1, *_declared(explained)]},
               {"name": MAPS_OUTPUT, "datatype": "FP32", "shape": [-1, height, width]},
               {"name": RESOLVED_TARGETS_OUTPUT, "datatype": "INT64", "shape": [-1]},
               {"name": OBJECTIVE_OUTPUT, "datatype": "FP32", "shape": [-1]}]
    for index in range(len(spec.target_layers)):  # gradients [N, K, C, h, w]: K = 1 for one target per instance
        outputs += [{"name": activations_output(index), "datatype": "FP32", "shape": [-1, -1, -1, -1]},
                    {"name": gradients_output(index), "datatype": "FP32", "shape": [-1, -1, -1, -1, -1]}]
    inputs = [{"name": spec.image_input, "datatype": "FP32", "shape": [-1, *_declared(form.dims[1:])]},
              {"name": TARGETS_TENSOR, "datatype": "INT64", "shape": [-1]}]
    return inputs, outputs


def k_target_shapes(model: ServedModel) -> dict[str, list[int]]:
    """The shapes of input ``TARGETS_TENSOR`` and the outputs that gain a K axis with K targets per
    instance (parameters.targets as lists, or input explainrt.targets [N, K]): K (-1) after
    the batch axis."""
    height, width = _map_size(model)
    return {TARGETS_TENSOR: [-1, -1], MAPS_OUTPUT: [-1, -1, height, width], RESOLVED_TARGETS_OUTPUT: [-1, -1],
            OBJECTIVE_OUTPUT: [-1, -1]}


def _map_size(model: ServedModel) -> tuple[int, int]:
    height, width = _declared(model.explainer.input_form.nchw[2:])
    return height, width


def _declared(dims: tuple[Any, ...]) -> list[int]:
    """Sizes as V2 metadata declares them: -1 for a size known per request (None, a name, or 0)."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in dims]


def metadata(model: ServedModel) -> dict[str, Any]:
    """The V2 model metadata: ``metadata_tensors``, and as parameters the K-target shapes, the map formats, the
    methods, target layers, classes and preprocessing."""
    inputs, outputs = metadata_tensors(model)
    return {
        "name": model.name, "versions": ["1"], "platform": "onnxruntime_onnx", "inputs": inputs, "outputs": outputs,
        "parameters": {"image_input_also_accepts": "UINT8 [-1, -1, -1, 3] raw RGB images",
                       "input_layout": model.explainer.input_form.layout,
                       "k_target_shapes": k_target_shapes(model), "maps_formats": dict(codec.V2_MAP_FORMATS),
                       "methods": list(METHODS), "target_layers": list(model.explainer.spec.target_layers),
                       "num_classes": model.num_classes, "preprocessing": _preprocessing_summary(model)},
    }


def _preprocessing_summary(model: ServedModel) -> dict[str, Any] | None:
    """The stored preprocessing without its label list (the labels come with each prediction)."""
    preprocessing = model.explainer.preprocessing
    if preprocessing is None:
        return None
    return {"input_size": list(preprocessing.input_size), "resize_shorter": preprocessing.resize_shorter,
            "mean": list(preprocessing.mean), "std": list(preprocessing.std), "interpolation": preprocessing.interpolation,
            "labels": len(preprocessing.labels) if preprocessing.labels else None}
