"""What an explainable model is: the names it adds, the spec stored in its metadata, loading.

An explainable model keeps every original node and output and adds:

- input  ``explainrt.targets``            int64 ``[N, K]``: a class index, or ``-k`` for the
  k-th most likely class of that image;
- output ``explainrt.resolved_targets``   int64 ``[N, K]``: the class each target resolved to;
- output ``explainrt.activations.<i>``    ``[N, C, h, w]`` for the i-th target layer;
- output ``explainrt.gradients.<i>``      ``[N, K, C, h, w]``: d logit[target] / d activations;
- output ``explainrt.maps.<method>``      ``[N, K, H, W]`` with map heads (``explainrt.export.heads``):
  the method's normalised maps, computed in the graph (float32, float16 or uint8 0..255).

The explained output ("logits") may be ``[N, classes]`` or ``[N, classes, ...]`` (a segmentation
map, a detector's raw head): a class index then means the sum of that channel over the other
axes. The ``weights`` objective (a variant, ``explainrt.export.variants``) takes input
``explainrt.weights`` ``[N, K, *output]`` instead of the class indices: target k is the linear
objective sum(weights[:, k] * output), any such objective in one call.

What the engine needs to run the model without the original code (input name, logits, target
layers, preprocessing) is stored as JSON in the model's metadata under ``explainrt``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from explainrt.autodiff.builder import node_reads
from explainrt.errors import InvalidModelError

TARGETS_INPUT = "explainrt.targets"
WEIGHTS_INPUT = "explainrt.weights"
BOXES_INPUT = "explainrt.boxes"
RESOLVED_TARGETS_OUTPUT = "explainrt.resolved_targets"
BOX_MATCHES_OUTPUT = "explainrt.box_matches"
BOX_OBJECTIVES_OUTPUT = "explainrt.box_objectives"  # [N, K]: each box's objective (its matched predictions' scores)
METADATA_KEY = "explainrt"


def activations_output(index: int) -> str:
    return f"explainrt.activations.{index}"


def gradients_output(index: int) -> str:
    return f"explainrt.gradients.{index}"


MAPS_PREFIX = "explainrt.maps."


def maps_output(method: str) -> str:
    """Output of a map head: the normalised maps ``[N, K, H, W]`` of ``method``."""
    return f"{MAPS_PREFIX}{method}"


REFERENCE_PREFIX = "explainrt.reference."
RELU_OUTPUT_PREFIX = "explainrt.relu."
TAP_PREFIX = "explainrt.tap."
"""Outputs the PyTorch export adds to read target modules (named by the user as modules, not tensors)."""


def reference_input(index: int) -> str:
    """Input of a defended model: the k-th defended Relu's activations on the unperturbed image."""
    return f"{REFERENCE_PREFIX}{index}"


def relu_output(index: int) -> str:
    """Output of a defended model: the k-th defended Relu's activations, to feed back as references."""
    return f"{RELU_OUTPUT_PREFIX}{index}"


@dataclass(frozen=True)
class ExplainableSpec:
    """What an explainable model says about itself (stored in its metadata)."""

    image_input: str
    logits: str
    num_classes: int
    target_layers: tuple[str, ...]
    preprocessing: str | None = None  # JSON of explainrt.preprocessing.Preprocessing
    objective: str = "logit"  # what is differentiated per target: see OBJECTIVES
    layouts: tuple[dict, ...] = ()  # per target layer, explainrt.export.layouts.Layout as JSON (() : all NCHW)
    maps: tuple[str, ...] = ()  # methods with a map head (output explainrt.maps.<method>)
    maps_dtype: str = "float32"  # element type of the map outputs: float32, float16 or uint8 (0..255)
    maps_only: bool = False  # activations and gradients are not outputs (only logits, targets and maps)
    output_shape: tuple[int | None, ...] = ()  # the explained output's axes after N (None: known at run time)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> ExplainableSpec:
        props = {p.key: p.value for p in model.metadata_props}
        if METADATA_KEY not in props:
            raise InvalidModelError("the model is not explainable (no explainrt metadata): run make_explainable first")
        try:
            fields = json.loads(props[METADATA_KEY])
            fields["target_layers"] = tuple(fields["target_layers"])
            fields["layouts"] = tuple(fields.get("layouts", ()))
            fields["maps"] = tuple(fields.get("maps", ()))
            fields["output_shape"] = tuple(fields.get("output_shape", ()))
            return cls(**fields)
        except (ValueError, TypeError, KeyError) as error:
            raise InvalidModelError(f"corrupt explainrt metadata in the model: {error}") from error


ModelSource = str | os.PathLike | bytes | onnx.ModelProto


def load_model(source: ModelSource) -> onnx.ModelProto:
    """Read an ONNX model from a path, serialized bytes or a ModelProto (copied)."""
    if isinstance(source, onnx.ModelProto):
        return copy.deepcopy(source)
    if not isinstance(source, (bytes, str, os.PathLike)):
        raise InvalidModelError(f"an ONNX model is a path, serialized bytes or an onnx.ModelProto, got "
                                f"{type(source).__name__}")
    try:
        if isinstance(source, bytes):
            model = onnx.load_from_string(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise InvalidModelError(f"model file not found: {path}")
            model = onnx.load(str(path))
    except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, OSError, ValueError) as error:
        raise InvalidModelError(f"cannot read ONNX model {source!r}: {error}") from error
    if not model.graph.node:
        name = "the bytes given" if isinstance(source, bytes) else repr(source)
        raise InvalidModelError(f"{name} hold no ONNX graph (empty or corrupt model)")
    return model


OBJECTIVES = {
    "logit": "the target's logit y_t",
    "cross_entropy": "the cross-entropy loss -log softmax(y)_t (Contrast-CAM, confidence gradients)",
    "probability": "the target's softmax probability softmax(y)_t over the classes (axis 1)",
    "weights": "a linear objective sum(w * y), w fed per image and target as explainrt.weights [N, K, *shape(y)[1:]]",
    "boxes_yolov8": "a detector head's class score summed over the predictions whose box overlaps a given box with IoU "
                    ">= a threshold, decided in the graph on the same pass: explainrt.boxes [N, K, 6] (x1, y1, x2, y2, "
                    "class, iou) on a YOLOv8 head [N, 4 + classes, anchors]; outputs explainrt.box_matches [N, K] (how many "
                    "predictions each box matched) and explainrt.box_objectives [N, K] (the objective)",
    "boxes_yolov5": "the same on a YOLOv5 head [N, anchors, 5 + classes] (score: objectness x class)",
    "weights_boxes_yolov8": "per target, a linear objective sum(w * y) plus the box objectives of B boxes, in one pass: "
                            "explainrt.weights [N, K, *shape(y)[1:]] and explainrt.boxes [N, K, B, 6] (a box with iou "
                            "> 1 matches nothing: padding) on a YOLOv8 head; output explainrt.box_matches [N, K, B]",
    "weights_boxes_yolov5": "the same on a YOLOv5 head",
}
BOX_OBJECTIVES = {"boxes_yolov8": "yolov8", "boxes_yolov5": "yolov5", "weights_boxes_yolov8": "yolov8",
                  "weights_boxes_yolov5": "yolov5"}
"""The box objectives and the detector layout each reads."""
WEIGHTED_BOX_OBJECTIVES = ("weights_boxes_yolov8", "weights_boxes_yolov5")
"""Box objectives that also take a weights input (targets fed as a pair: weights, boxes [N, K, B, 6])."""


def is_explainable(model: onnx.ModelProto) -> bool:
    """Whether ``model`` carries explainrt's metadata (made by make_explainable or from_torch)."""
    return any(prop.key == METADATA_KEY for prop in model.metadata_props)


def with_preprocessing(model: onnx.ModelProto, preprocessing: str | None) -> onnx.ModelProto:
    """The explainable ``model`` (changed in place) with its stored preprocessing JSON replaced."""
    spec = dataclasses.replace(ExplainableSpec.from_model(model), preprocessing=preprocessing)
    set_metadata(model, METADATA_KEY, spec.to_json())
    return model


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def original_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without what make_explainable added: plain inference, its original outputs (and the explained
    tensor, where make_explainable made an inner one an output)."""
    plain = copy.deepcopy(model)
    graph = plain.graph
    for field_name, prefix in (("node", "explainrt/"), ("initializer", "explainrt/"), ("input", "explainrt."), ("output", "explainrt.")):
        items = getattr(graph, field_name)
        kept = [item for item in items if not item.name.startswith(prefix)]
        del items[:]
        items.extend(kept)
    kept_props = [p for p in plain.metadata_props if p.key != METADATA_KEY]
    del plain.metadata_props[:]
    plain.metadata_props.extend(kept_props)
    return plain


def prune_added_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes and constants explainrt added that no output needs (e.g. weight gradients)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if not node.name.startswith("explainrt/") or any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(keep))
    unused = [t for t in graph.initializer if t.name.startswith("explainrt/") and t.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)
