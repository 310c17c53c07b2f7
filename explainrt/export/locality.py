"""The spatially local front of an image model: where a changed box of pixels can reach, and where to cut.

Most CNNs start with a long run of operators that only mix nearby pixels (convolutions, pooling,
element-wise activations, residual additions, channel concatenations). A change confined to a box
of the input then changes only a box of each of their outputs, growing with the receptive field.
Exact incremental inference (Krypton, Nakandala et al., SIGMOD 2019) re-computes only those boxes;
this module supplies what that needs from the ONNX graph, and nothing about running it:

- ``LocalFront.of(model, image_input)``: the local operators from the image input on, each with
  its per-axis window (output j reads input rows ``[j*stride - pad_begin, ... + extent)``), and the
  *cuts*: tensors that every path from the image to the outputs passes through (block outputs of
  a ResNet), where the graph can be split into stages;
- ``sizes``, ``changed`` and ``needed``: exact interval arithmetic per spatial axis, vectorised
  over many box positions (forward: which outputs a changed input interval reaches; backward:
  which inputs an output interval reads);
- ``stage_model(start, end)``: the sub-model from one cut to the next (``end=None``: to the outputs).

The front ends at the first operator that is not local or whose geometry depends on the input size
(a global pooling, a flatten, "SAME" auto-padding, ceil-mode pooling). Tensors are NCHW.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from explainrt.autodiff.builder import TensorInfo, tensor_infos
from explainrt.errors import InvalidModelError

UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Erf", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Identity", "Dropout", "Mish",
    "Gelu", "BatchNormalization", "LRN", "Floor", "Ceil", "Round", "Sign",
})
"""Operators that act on each pixel on its own (their other inputs must be constants)."""

ELEMENTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"})
"""Operators combining several same-sized spatial tensors (or constants) pixel by pixel."""


@dataclass(frozen=True)
class AxisWindow:
    """One spatial axis of a local operator: output j reads input ``[j*stride - pad_begin, +extent)``."""

    extent: int
    stride: int
    pad_begin: int
    pad_end: int

    def size(self, size_in: np.ndarray | int) -> np.ndarray | int:
        """Output length for an input of length ``size_in``."""
        return (size_in + self.pad_begin + self.pad_end - self.extent) // self.stride + 1

    def forward(self, start: np.ndarray, end: np.ndarray, size_out: int) -> tuple[np.ndarray, np.ndarray]:
        """Outputs whose window meets the input interval [start, end) (empty stays empty)."""
        first = np.maximum(0, -((self.extent - 1 - self.pad_begin - start) // self.stride))
        last = np.minimum(size_out, (end - 1 + self.pad_begin) // self.stride + 1)
        return _emptied(first, last, start >= end)

    def backward(self, start: np.ndarray, end: np.ndarray, size_in: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs the outputs [start, end) read, clipped to the input (empty stays empty)."""
        first = np.maximum(0, start * self.stride - self.pad_begin)
        last = np.minimum(size_in, (end - 1) * self.stride - self.pad_begin + self.extent)
        return _emptied(first, last, start >= end)


IDENTITY = AxisWindow(1, 1, 0, 0)

Interval = tuple[np.ndarray, np.ndarray]
"""[start, end) per box position (int64 arrays of one shape); empty where start >= end."""


def _emptied(first: np.ndarray, last: np.ndarray, empty: np.ndarray) -> Interval:
    return np.where(empty, 0, first), np.where(empty, 0, last)


def _hull(intervals: Sequence[Interval]) -> Interval:
    """Smallest interval holding every non-empty one."""
    starts = np.stack([np.where(s < e, s, np.iinfo(np.int64).max) for s, e in intervals])
    ends = np.stack([np.where(s < e, e, np.iinfo(np.int64).min) for s, e in intervals])
    first, last = starts.min(axis=0), ends.max(axis=0)
    return _emptied(first, last, first >= last)


@dataclass(frozen=True)
class LocalNode:
    """A local operator of the front: its spatial inputs, output, window per axis (H, W) and cost."""

    index: int  # position in the model's node list
    inputs: tuple[str, ...]  # spatial (image-dependent) inputs
    output: str
    windows: tuple[AxisWindow, AxisWindow]
    macs: int  # multiply-accumulates per output position (all channels); element-wise ops count one per channel


class LocalFront:
    """The local operators of a model from its image input, its cuts, and interval arithmetic over them."""

    def __init__(self, model: onnx.ModelProto, image_input: str, nodes: list[LocalNode], cuts: list[str],
                 constants: set[str], infos: dict[str, TensorInfo]) -> None:
        self.model = model
        self.image_input = image_input
        self.nodes = nodes
        self.cuts = cuts  # cuts[0] is the image input; every cut separates the image from the outputs
        self._constants = constants
        self._infos = infos
        self._order = {node.output: position for position, node in enumerate(nodes)}

    @classmethod
    def of(cls, model: onnx.ModelProto, image_input: str) -> LocalFront:
        """Analyse ``model`` (any ONNX model whose input ``image_input`` is NCHW)."""
        graph = model.graph
        if image_input not in {value.name for value in graph.input}:
            raise InvalidModelError(f"the model has no input {image_input!r}")
        try:
            infos = tensor_infos(onnx.shape_inference.infer_shapes(model))
        except onnx.shape_inference.InferenceError as error:
            raise InvalidModelError(f"ONNX shape inference fails on the model: {error}") from error
        constants = _constant_tensors(graph)
        consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
        for value in graph.output:
            consumers[value.name] = consumers.get(value.name, 0) + 1
        local = {image_input}
        live = {image_input}
        nodes: list[LocalNode] = []
        cuts = [image_input]
        for index, node in enumerate(graph.node):
            spatial = [name for name in node.input if name and name not in constants]
            if not spatial:
                continue  # constant-valued: copied into whichever stage uses it
            windows = _windows(node, constants) if all(name in local for name in spatial) else None
            if windows is None or any(consumers.get(extra) for extra in node.output[1:] if extra):
                break
            nodes.append(LocalNode(index, tuple(spatial), node.output[0], windows,
                                   _macs(node, infos, constants, windows)))
            local.add(node.output[0])
            for name in spatial:
                consumers[name] -= 1
                if consumers[name] == 0:
                    live.discard(name)
            if consumers.get(node.output[0]):
                live.add(node.output[0])
            if len(live) == 1 and node.output[0] in live:
                cuts.append(node.output[0])
        return cls(model, image_input, nodes, cuts, constants, infos)

    def channels(self, name: str) -> int:
        """Channels of a tensor of the front (1 when shape inference could not tell)."""
        return _channels_of(self._infos, name) or 1

    def stage_nodes(self, start: str, end: str) -> list[LocalNode]:
        """The local nodes computing ``end`` from the cut ``start``."""
        first = 0 if start == self.image_input else self._order[start] + 1
        return self.nodes[first : self._order[end] + 1]

    def sizes(self, height: int, width: int) -> dict[str, tuple[int, int]]:
        """Spatial size (h, w) of every tensor of the front for an input of ``height`` x ``width``."""
        sizes = {self.image_input: (height, width)}
        for node in self.nodes:
            inputs = {sizes[name] for name in node.inputs}
            if len(inputs) != 1:
                raise InvalidModelError(f"node {node.output!r} combines tensors of different sizes {sorted(inputs)}")
            (h, w), (wh, ww) = inputs.pop(), node.windows
            sizes[node.output] = (int(wh.size(h)), int(ww.size(w)))
        return sizes

    def changed(self, axis: int, start: np.ndarray, end: np.ndarray, sizes: dict[str, tuple[int, int]],
                until: str) -> dict[str, Interval]:
        """Interval of every tensor up to ``until`` that a changed input interval (axis 0 = H, 1 = W) reaches."""
        reach: dict[str, Interval] = {self.image_input: (np.asarray(start, np.int64), np.asarray(end, np.int64))}
        for node in self.stage_nodes(self.image_input, until):
            window = node.windows[axis]
            size_out = sizes[node.output][axis]
            reach[node.output] = _hull([window.forward(*reach[name], size_out) for name in node.inputs])
        return reach

    def needed(self, axis: int, start: str, end: str, interval: Interval,
               sizes: dict[str, tuple[int, int]]) -> Interval:
        """Interval of the cut ``start`` that computing ``interval`` of the cut ``end`` reads."""
        wanted: dict[str, list[Interval]] = {end: [interval]}
        for node in reversed(self.stage_nodes(start, end)):
            if node.output not in wanted:
                continue
            region = _hull(wanted.pop(node.output))
            for name in node.inputs:
                wanted.setdefault(name, []).append(node.windows[axis].backward(*region, sizes[name][axis]))
        return _hull(wanted[start])

    def strides(self, start: str, end: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per axis, the step a crop of ``start`` must begin on so that every stride in the stage lines
        up, and how many pixels of ``start`` one pixel of ``end`` steps over."""
        strides: dict[str, tuple[int, int]] = {start: (1, 1)}
        steps = (1, 1)
        for node in self.stage_nodes(start, end):
            before = {strides[name] for name in node.inputs}
            if len(before) != 1:
                raise InvalidModelError(f"node {node.output!r} adds tensors of different strides {sorted(before)}")
            (sh, sw), (wh, ww) = before.pop(), node.windows
            strides[node.output] = (sh * wh.stride, sw * ww.stride)
            steps = (math.lcm(steps[0], sh * wh.stride), math.lcm(steps[1], sw * ww.stride))
        return steps, strides[end]

    def stage_macs(self, start: str, end: str, crop: tuple[int, int]) -> float:
        """Multiply-accumulates of one copy of the stage ``start`` -> ``end`` run on a crop of ``start``."""
        sizes = {start: crop}
        total = 0.0
        for node in self.stage_nodes(start, end):
            h, w = sizes[node.inputs[0]]
            sizes[node.output] = (int(node.windows[0].size(h)), int(node.windows[1].size(w)))
            total += node.macs * max(sizes[node.output][0], 0) * max(sizes[node.output][1], 0)
        return total

    def stage_model(self, start: str, end: str | None, outputs: Sequence[str] = ()) -> onnx.ModelProto:
        """The sub-model computing the cut ``end`` from the cut ``start`` (batch, height and width free);
        ``end=None``: from ``start`` to ``outputs`` of the original model."""
        graph = self.model.graph
        if end is None:
            skipped = {node.index for node in self.stage_nodes(self.image_input, start)} if start != self.image_input else set()
            chosen = [node for index, node in enumerate(graph.node) if index not in skipped
                      and any(name not in self._constants for name in node.input if name)]
            wanted = list(outputs)
        else:
            chosen = [graph.node[node.index] for node in self.stage_nodes(start, end)]
            wanted = [end]
        chosen = _with_constant_producers(graph, chosen, self._constants)
        used = {name for node in chosen for name in node.input if name}
        elem_type = self._elem_type(start)
        channels = _channels_of(self._infos, start)
        inputs = [helper.make_tensor_value_info(start, elem_type, ["batch", channels or "channels", "height", "width"])]
        others = [value for value in graph.input if value.name in used and value.name != start
                  and value.name not in {i.name for i in graph.initializer}]
        if others:
            raise InvalidModelError(f"the stage from {start!r} also reads the model inputs {[v.name for v in others]}")
        results = [helper.make_empty_tensor_value_info(name) for name in wanted]
        for value in results:
            value.type.tensor_type.elem_type = elem_type if end is not None else self._elem_type(value.name)
        sub = helper.make_graph(chosen, f"{graph.name}_stage", inputs, results,
                                [tensor for tensor in graph.initializer if tensor.name in used])
        stage = helper.make_model(sub, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version)
        stage.functions.extend(self.model.functions)
        return stage

    def _elem_type(self, name: str) -> int:
        info = self._infos.get(name)
        if info is None:
            raise InvalidModelError(f"cannot type the tensor {name!r} of the model")
        return info.elem_type


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Initializers and everything computed from constants alone."""
    constants = {tensor.name for tensor in graph.initializer}
    for node in graph.node:
        if all(name in constants for name in node.input if name) and node.op_type not in {"RandomNormal", "RandomUniform"}:
            constants.update(node.output)
    return constants


def _with_constant_producers(graph: onnx.GraphProto, chosen: list[onnx.NodeProto], constants: set[str]) -> list[onnx.NodeProto]:
    """``chosen`` plus the constant-valued nodes they read from, in the model's order."""
    producers = {out: index for index, node in enumerate(graph.node) for out in node.output}
    keep = {producers[name] for node in chosen for name in node.input if name in constants and name in producers}
    stack = list(keep)
    while stack:
        for name in graph.node[stack.pop()].input:
            if name in producers and producers[name] not in keep:
                keep.add(producers[name])
                stack.append(producers[name])
    ids = {id(node) for node in chosen}
    return [node for index, node in enumerate(graph.node) if index in keep or id(node) in ids]


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _windows(node: onnx.NodeProto, constants: set[str]) -> tuple[AxisWindow, AxisWindow] | None:
    """The node's window per spatial axis, or None when it is not local (or its geometry is not static)."""
    op = node.op_type
    if op in UNARY_OPS or op in ELEMENTWISE_OPS:
        return (IDENTITY, IDENTITY)
    if op == "Concat":
        return (IDENTITY, IDENTITY) if _attribute(node, "axis", None) in (1, -3) else None
    if op not in {"Conv", "MaxPool", "AveragePool"}:
        return None
    auto_pad = _attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID") or _attribute(node, "ceil_mode", 0):
        return None
    kernel = list(_attribute(node, "kernel_shape", []))  # type: ignore[arg-type]
    if not kernel and op == "Conv" and len(node.input) > 1:
        return None  # weights of unknown shape: not analysed
    if len(kernel) != 2:
        return None
    strides = list(_attribute(node, "strides", [1, 1]))  # type: ignore[arg-type]
    dilations = list(_attribute(node, "dilations", [1, 1]))  # type: ignore[arg-type]
    pads = list(_attribute(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]  # type: ignore[arg-type]
    return tuple(AxisWindow((kernel[axis] - 1) * dilations[axis] + 1, strides[axis], pads[axis], pads[axis + 2])
                 for axis in (0, 1))  # type: ignore[return-value]


def _macs(node: onnx.NodeProto, infos: dict[str, TensorInfo], constants: set[str], windows: tuple[AxisWindow, AxisWindow]) -> int:
    """Multiply-accumulates per output position: the convolution's weights, else one per channel (or kernel tap)."""
    channels = _channels_of(infos, node.output[0]) or 1
    if node.op_type == "Conv":
        weight = infos.get(node.input[1])
        if weight is not None and weight.shape is not None and all(isinstance(d, int) for d in weight.shape):
            return int(np.prod(weight.shape))
    taps = windows[0].extent * windows[1].extent if node.op_type in {"MaxPool", "AveragePool"} else 1
    return channels * taps


def _channels_of(infos: dict[str, TensorInfo], name: str) -> int | None:
    info = infos.get(name)
    if info is None or info.shape is None or len(info.shape) != 4 or not isinstance(info.shape[1], int):
        return None
    return int(info.shape[1])
