"""TensorRT compatibility of an ONNX model, checked without TensorRT.

TensorRT's ONNX parser (onnx-tensorrt) publishes which ONNX operators it supports, for which
element types, and with which restrictions (MaxPool without its ``Indices`` output, Resize modes,
TopK sorted with K < 3840, reduction axes given as constants...). explainrt ships that table as
data (``data/onnx_tensorrt_operators.json``, with the TensorRT version it describes) and checks
every node of a model against it, so an explainable model can be vetted on a machine without a
GPU before an engine is built from it (``explainrt check-trt MODEL.onnx``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TABLE_FILE = "onnx_tensorrt_operators.json"
DEFAULT_DOMAINS = ("", "ai.onnx")
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"})

# ONNX element types under the names TensorRT's table uses (the others keep ONNX's name).
_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.FLOAT4E2M1: "FP4",
}
# Which inputs carry the data whose type the table restricts (input 0 unless named here; ops
# without inputs are checked on their output). Index, shape and axes inputs are not data.
_DATA_INPUTS = {"Where": (1, 2), "Range": (0, 1, 2)}
_CHECKS_OUTPUT_TYPE = frozenset({"Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal",
                                 "RandomUniform"})


@dataclass(frozen=True)
class OperatorTable:
    """onnx-tensorrt's support matrix: per operator its element types (None: unsupported) and restrictions."""

    tensorrt_version: str
    opset_min: int
    opset_max: int
    operators: dict[str, tuple[str, ...] | None]
    restrictions: dict[str, tuple[dict[str, Any], ...]]
    cast_down_types: frozenset[str]
    source: str

    @classmethod
    def from_json(cls, text: str) -> OperatorTable:
        data = json.loads(text)
        return cls(
            tensorrt_version=data["tensorrt_version"],
            opset_min=int(data["opset_min"]),
            opset_max=int(data["opset_max"]),
            operators={op: tuple(types) if types is not None else None for op, types in data["operators"].items()},
            restrictions={op: tuple(rules) for op, rules in data["restrictions"].items()},
            cast_down_types=frozenset(data["cast_down_types"]),
            source=data["source"],
        )


@functools.cache
def operator_table() -> OperatorTable:
    """The shipped table (read once)."""
    text = resources.files("explainrt.deploy").joinpath("data").joinpath(TABLE_FILE).read_text(encoding="utf-8")
    return OperatorTable.from_json(text)


@dataclass(frozen=True)
class Finding:
    """One node (or the model, node "<model>") that TensorRT's ONNX parser would not accept as it is."""

    node: str
    op_type: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.problem}"


def check_tensorrt_support(model: onnx.ModelProto, table: OperatorTable | None = None) -> list[Finding]:
    """Every operator, element type, attribute and constant-input restriction TensorRT would reject.

    Element types come from ONNX shape inference; a restriction that needs a value or shape the
    graph does not reveal statically is reported only when it is certainly violated, except that
    inputs TensorRT needs as build-time constants must be initializers, Constant nodes, or computed
    from those alone.
    """
    table = table or operator_table()
    inferred = _inferred(model)
    graph = _GraphFacts.of(inferred.graph)
    findings = list(_opset_findings(inferred, table))
    for index, node in _all_nodes(inferred.graph):
        findings += _node_findings(node, node.name or f"{node.op_type}#{index}", graph, table)
    return findings


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError):
        return model  # types stay unknown where inference fails: those checks are skipped


def _opset_findings(model: onnx.ModelProto, table: OperatorTable) -> Iterator[Finding]:
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS and not table.opset_min <= opset.version <= table.opset_max:
            yield Finding("<model>", "opset", f"ONNX opset {opset.version} is outside the range TensorRT "
                                              f"{table.tensorrt_version} parses ({table.opset_min}..{table.opset_max})")


def _all_nodes(graph: onnx.GraphProto) -> Iterator[tuple[int, onnx.NodeProto]]:
    """Nodes of the graph and of every subgraph (If/Loop/Scan bodies)."""
    for index, node in enumerate(graph.node):
        yield index, node
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                yield from _all_nodes(subgraph)


@dataclass(frozen=True)
class _GraphFacts:
    """Element types, shapes, constant tensors and their values, for the checks."""

    types: dict[str, int]
    shapes: dict[str, tuple[int | None, ...] | None]
    constants: frozenset[str]
    values: dict[str, np.ndarray]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> _GraphFacts:
        types: dict[str, int] = {}
        shapes: dict[str, tuple[int | None, ...] | None] = {}
        for info in _value_infos(graph):
            tensor = info.type.tensor_type
            types[info.name] = tensor.elem_type
            shapes[info.name] = (tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
                                 if tensor.HasField("shape") else None)
        values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for init in graph.initializer:
            types.setdefault(init.name, init.data_type)
            shapes.setdefault(init.name, tuple(init.dims))
        constants = set(values)
        dims: dict[str, list[int | None]] = {}  # 1-D shape values, partly known (dynamic batch)
        for node in graph.node:  # topological order: a node of constants is folded by TensorRT
            if node.op_type == "Constant":
                constants.update(node.output)
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    values[node.output[0]] = numpy_helper.to_array(value)
            elif node.input and node.op_type not in RANDOM_OPS and all(not i or i in constants for i in node.input):
                constants.update(node.output)
            folded = _shape_value(node, shapes, values, dims)
            if folded is not None:
                dims[node.output[0]] = folded
                if all(d is not None for d in folded):
                    values[node.output[0]] = np.array(folded, dtype=np.int64)
        return cls(types, shapes, frozenset(constants), values)


def _shape_value(node: onnx.NodeProto, shapes: dict[str, tuple[int | None, ...] | None],
                 values: dict[str, np.ndarray], dims: dict[str, list[int | None]]) -> list[int | None] | None:
    """The (partly known) value of a shape computation: Shape, and Slice/Gather of one with constant indices.

    Exporters compute sizes such as the class count from ``Shape(logits)``; with a dynamic batch
    the shape is not constant, but the sliced static part is, and TensorRT resolves it at build time.
    """
    if node.op_type == "Shape":
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        start, end = _attribute(node, "start", 0), _attribute(node, "end", len(shape))
        return list(shape[start:end])
    source = dims.get(node.input[0]) if node.input else None
    if source is None:
        return None
    if node.op_type == "Slice" and len(node.input) == 3 and all(i in values for i in node.input[1:]):
        start, end = (int(values[i].reshape(-1)[0]) for i in node.input[1:])
        return source[start:end]
    if node.op_type == "Gather" and node.input[1] in values and values[node.input[1]].ndim <= 1:
        return [source[int(i)] for i in values[node.input[1]].reshape(-1)]
    return None


def _value_infos(graph: onnx.GraphProto) -> Iterable[onnx.ValueInfoProto]:
    yield from graph.input
    yield from graph.value_info
    yield from graph.output


def _type_name(elem_type: int) -> str:
    return _TYPE_NAMES.get(elem_type) or TensorProto.DataType.Name(elem_type)


def _node_findings(node: onnx.NodeProto, name: str, graph: _GraphFacts, table: OperatorTable) -> list[Finding]:
    def finding(problem: str) -> Finding:
        return Finding(name, node.op_type, problem)

    if node.domain not in DEFAULT_DOMAINS:
        return [finding(f"operator of domain {node.domain!r} is not in TensorRT's ONNX parser (it needs a plugin)")]
    if node.op_type not in table.operators:
        return [finding(f"operator is not listed in TensorRT {table.tensorrt_version}'s ONNX operator table")]
    types = table.operators[node.op_type]
    if types is None:
        return [finding(f"operator is not supported by TensorRT {table.tensorrt_version}")]
    findings = [finding(problem) for problem in _type_problems(node, graph, types, table)]
    for rule in table.restrictions.get(node.op_type, ()):
        problem = _violation(rule, node, graph)
        if problem:
            findings.append(finding(f"{problem} (TensorRT: {rule['text']})"))
    return findings


def _type_problems(node: onnx.NodeProto, graph: _GraphFacts, types: tuple[str, ...], table: OperatorTable) -> Iterator[str]:
    tensors = [node.input[i] for i in _DATA_INPUTS.get(node.op_type, (0,)) if i < len(node.input) and node.input[i]]
    if node.op_type in _CHECKS_OUTPUT_TYPE or not node.input:
        tensors += node.output[:1]
    for tensor in tensors:
        if tensor not in graph.types or graph.types[tensor] == TensorProto.UNDEFINED:
            continue
        type_name = _type_name(graph.types[tensor])
        if type_name not in types and type_name not in table.cast_down_types:
            yield f"tensor {tensor!r} has element type {type_name}; TensorRT supports {', '.join(types)} here"


def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _violation(rule: dict[str, Any], node: onnx.NodeProto, graph: _GraphFacts) -> str | None:
    """What the node does against one restriction of the table, or None when it complies (or cannot be known)."""
    kind = rule["rule"]
    position = rule.get("input")
    tensor = node.input[position] if position is not None and position < len(node.input) else ""
    if kind == "attribute_in":
        value = _attribute(node, rule["attribute"], rule.get("default"))
        return None if value in rule["value"] else f"attribute {rule['attribute']}={value!r}"
    if kind == "all_ones":
        value = _attribute(node, rule["attribute"])
        return None if not value or all(v == 1 for v in value) else f"attribute {rule['attribute']}={list(value)}"
    if kind == "forbidden_attributes":
        used = [a.name for a in node.attribute if a.name in rule["value"]]
        return f"uses attribute(s) {used}" if used else None
    if kind == "max_outputs":
        used = [o for o in node.output[rule["value"]:] if o]
        return f"uses output(s) {used}" if used else None
    value = graph.values.get(tensor)
    if kind == "value_below":
        return f"input {position} ({tensor!r}) is {value.tolist()}" if value is not None and np.any(value >= rule["value"]) else None
    if kind in ("constant", "constant_false"):
        if not tensor:
            return None
        if tensor not in graph.constants and value is None:
            return f"input {position} ({tensor!r}) is computed at run time"
        if kind == "constant_false" and value is not None and bool(np.any(value)):
            return f"input {position} ({tensor!r}) is true"
        return None
    shape = graph.shapes.get(node.input[0]) if node.input else None
    if kind == "spatial_rank":
        return None if shape is None or len(shape) - 2 in rule["value"] else f"input has {len(shape) - 2} spatial dimensions"
    if kind == "input_rank":
        return None if shape is None or len(shape) in rule["value"] else f"input has rank {len(shape)}"
    if kind == "static_shape":
        return None if shape is not None and all(d is not None for d in shape) else "input shape is not static"
    raise ValueError(f"the TensorRT operator table has an unknown restriction kind {kind!r}")
