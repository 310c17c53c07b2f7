"""Reverse-pass branches run on the window of their feature grid that the cotangent can reach.

A box objective seeds the gradient at the few predictions whose box overlaps the given one. On a detector
scale (YOLOv8's P3: an 80x80 grid at 640x640) the reverse pass through that scale's head spreads those values
only as far as its kernels reach, yet it runs over the whole grid: most of the cost of explaining a box. A
branch that ``run_when_nonzero`` wrapped in an ``If`` for one scale runs instead on the rows and columns from
the first to the last matched cell of the scale, widened by the sum of the branch's kernel radii and clipped
to the grid, and its outputs are padded back with zeros. This is exact: the cotangent is zero outside the
matched cells, and the reverse pass is linear in it. The one exception is inf or NaN in the forward pass, as
for the skipped branches. The branch's nodes must act on each grid cell apart (element-wise operators,
constants without a grid extent) or be "same" stride-1 convolutions (the head's Conv3x3 and Conv1x1), with
shape plumbing (Shape, Concat, Slice of shape vectors, Reshape to them) between. A branch with any other
node, or whose tensors' grid the static shapes do not give, runs on the whole grid as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from explainrt.autodiff.builder import (
    GraphBuilder,
    TensorInfo,
    sort_topologically,
    tensor_infos,
)
from explainrt.autodiff.zero_branches import ZeroBranches

log = logging.getLogger(__name__)

CELLWISE_OPS = frozenset({"Identity", "Sigmoid", "Relu", "Tanh", "Exp", "Neg", "Mul", "Add", "Sub", "Div", "Sum",
                          "Where", "Cast", "Greater", "Less", "Equal", "Not", "And", "Or"})
"""Operators that compute each grid cell from the same cell of their inputs."""


@dataclass(frozen=True)
class _Window:
    """How a branch runs on a window: its grid, how far its kernels reach, and the tensors from outside it
    that are cut to the window (``cells``: gradients whose grid is flattened into their last axis)."""

    grid: tuple[int, int]
    margin: int
    spatial: tuple[str, ...]
    cells: tuple[tuple[str, int], ...]  # with its rank
    output_ranks: tuple[int, ...]


def run_on_windows(model: onnx.ModelProto, branches: Mapping[str, frozenset[str]],
                   anchors: Mapping[str, tuple[int, int]], matched: str, record: ZeroBranches) -> int:
    """Run each ``If`` branch of ``model`` (``branches``: its name -> its sources, from ``run_when_nonzero``) whose
    sources are one scale's gradients (``anchors``: a source -> that scale's anchors) on the window of the
    scale's grid around the cells ``matched`` [N, K, anchors] (0/1) marks, where its nodes allow (changed in
    place); the number of branches so rewritten."""
    infos = tensor_infos(onnx.shape_inference.infer_shapes(model))
    b = GraphBuilder(model)
    rewritten = 0
    for node in [n for n in model.graph.node if n.op_type == "If" and n.name in branches]:
        sources = branches[node.name]
        scales = {anchors.get(source) for source in sources}
        if len(scales) != 1 or None in scales:
            continue
        ((start, stop),) = scales  # type: ignore[misc]
        then = next(a.g for a in node.attribute if a.name == "then_branch")
        window = _window(b, infos, then, node, sources, stop - start, record)
        if window is None:
            log.debug("%s runs on its whole grid: its nodes do not allow a window", node.name)
            continue
        _cut(b, node, then, window, matched, start, stop)
        rewritten += 1
    if rewritten:
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(sort_topologically(nodes))
    return rewritten


def _window(b: GraphBuilder, infos: dict[str, TensorInfo], then: onnx.GraphProto, node: onnx.NodeProto,
            sources: frozenset[str], cells: int, record: ZeroBranches) -> _Window | None:
    """The window plan of branch ``then`` (of ``If`` ``node``) over a grid of ``cells`` cells; None when one of
    its nodes or tensors does not allow it."""
    produced = {o for n in then.node for o in n.output}
    shapes: set[str] = set()  # shape vectors computed in the branch
    outer: set[str] = set()  # tensors from outside the branch that it reads as data or the shape of
    margin = 0
    for inner in then.node:
        constant = {i: b.constant_value(i) for i in inner.input if i}
        if inner.op_type == "Shape":
            pass
        elif inner.op_type in ("Concat", "Slice"):
            vectors = inner.input if inner.op_type == "Concat" else inner.input[:1]
            if not all(v in shapes or v == record.seeds or _plumbing_constant(constant.get(v)) for v in vectors):
                return None
            if inner.op_type == "Slice" and any(constant.get(i) is None for i in inner.input[1:] if i):
                return None
        elif inner.op_type == "Reshape":
            if inner.input[1] not in shapes:
                return None
        elif inner.op_type in ("Unsqueeze", "Squeeze"):
            axes = constant.get(inner.input[1]) if len(inner.input) > 1 else _attribute(inner, "axes")
            if axes is None or np.asarray(axes).reshape(-1).tolist() != [0]:
                return None
        elif inner.op_type == "Conv":
            radius = _same_conv_radius(b, inner)
            if radius is None:
                return None
            margin += radius
        elif inner.op_type in CELLWISE_OPS:
            # a constant that varies along the grid's rows or columns would broadcast against the window
            if any(v is not None and any(d != 1 for d in v.shape[-2:]) for v in constant.values()) \
                    or shapes.intersection(inner.input):
                return None
        else:
            return None
        if inner.op_type in ("Shape", "Concat", "Slice"):
            shapes.update(inner.output)
        data = inner.input[:1] if inner.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Conv", "Slice", "Shape") \
            else inner.input
        outer.update(i for i in data if i and i not in produced and i not in shapes and constant.get(i) is None
                     and i != record.seeds)
    grids = {shape[-2:] for name in outer - sources if (shape := _static(infos, name)) is not None and len(shape) >= 3}
    if len(grids) != 1 or not sources & outer:
        return None
    grid = grids.pop()
    if grid[0] * grid[1] != cells:
        return None
    spatial: list[str] = []
    flat: list[tuple[str, int]] = []
    for name in sorted(outer):
        shape = _static(infos, name)
        if name in record.gradient_of and name not in sources:  # another gradient: non-zero anywhere
            return None
        if shape is not None and len(shape) >= 3 and shape[-2:] == grid:
            spatial.append(name)
        elif name in sources and (form := _gradient_shape(infos, record, name)) is not None and form[-1] == cells:
            flat.append((name, len(form)))
        else:
            return None
    ranks = []
    for leaving in node.output:
        shape = _gradient_shape(infos, record, leaving)
        if shape is None or shape[-2:] != grid:
            return None
        ranks.append(len(shape))
    return _Window(grid, margin, tuple(spatial), tuple(flat), tuple(ranks))


def _cut(b: GraphBuilder, node: onnx.NodeProto, then: onnx.GraphProto, window: _Window, matched: str,
         start: int, stop: int) -> None:
    """Rewrite ``then`` to run on ``window``: the window's rows and columns computed before ``node`` from the
    scale's matched cells, the branch's inputs sliced to them, its outputs padded back to the grid."""
    height, width = window.grid
    b.scope = f"{node.name.rsplit('/', 1)[0]}/window"
    part = b.op("Slice", [matched, b.ints([start]), b.ints([stop]), b.ints([2])])
    grid = b.op("Reshape", [b.reduce("ReduceMax", part, [0, 1], keepdims=False), b.ints([height, width])])
    firsts, lasts = [], []
    for axis in (1, 0):  # any match per row (a max over the columns), then per column
        line = b.reduce("ReduceMax", grid, [axis], keepdims=False)
        firsts.append(b.op("ArgMax", [line], axis=0, keepdims=1))
        lasts.append(b.op("ArgMax", [line], axis=0, keepdims=1, select_last_index=1))
    reach = window.margin
    low = b.op("Max", [b.op("Sub", [b.concat(firsts, 0), b.ints([reach, reach])]), b.ints([0, 0])])
    high = b.op("Min", [b.op("Add", [b.concat(lasts, 0), b.ints([reach + 1, reach + 1])]), b.ints([height, width])])
    axes = b.ints([-2, -1])
    inside: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}

    def add(op_type: str, inputs: list[str], hint: str) -> str:
        output = b.fresh(hint)
        inside.append(helper.make_node(op_type, inputs, [output], name=output))
        return output

    for name in window.spatial:
        renamed[name] = add("Slice", [name, low, high, axes], f"{b.scope}/{name}")
    for name, rank in window.cells:
        as_grid = add("Reshape", [name, b.ints([0] * (rank - 1) + [height, width])], f"{b.scope}/{name}/grid")
        cut = add("Slice", [as_grid, low, high, axes], f"{b.scope}/{name}/cut")
        renamed[name] = add("Reshape", [cut, b.ints([0] * (rank - 1) + [-1])], f"{b.scope}/{name}")
    padded: list[onnx.NodeProto] = []
    remaining = b.op("Sub", [b.ints([height, width]), high])
    for output, rank in zip(then.output, window.output_ranks):
        zeros = [b.ints([0] * (rank - 2))] if rank > 2 else []
        pads = b.concat([*zeros, low, *zeros, remaining], 0)
        renamed[output.name] = b.fresh(f"{output.name}/window")
        padded.append(helper.make_node("Pad", [renamed[output.name], pads], [output.name], name=f"{output.name}/Pad"))
    for inner in then.node:
        inner.input[:] = [renamed.get(i, i) for i in inner.input]
        inner.output[:] = [renamed.get(o, o) for o in inner.output]
    nodes = [*inside, *then.node, *padded]
    del then.node[:]
    then.node.extend(nodes)


def _static(infos: dict[str, TensorInfo], name: str) -> tuple[int | str | None, ...] | None:
    """``name``'s shape, its last two dimensions known integers; None otherwise."""
    info = infos.get(name)
    shape = None if info is None else info.shape
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape[-2:]):
        return None
    return shape


def _gradient_shape(infos: dict[str, TensorInfo], record: ZeroBranches, gradient: str) -> tuple[object, ...] | None:
    """The shape of ``gradient`` from its forward tensor's (shape inference seldom types the reverse pass): the seed
    axis first, or merged into the batch; None where the forward shape's last two dimensions are not known."""
    forward, merged = record.gradient_of.get(gradient, ("", False))
    shape = _static(infos, forward)
    return None if shape is None else (shape if merged else ("K", *shape))


def _plumbing_constant(value: np.ndarray | None) -> bool:
    """A constant part of a shape vector that keeps a window's shape: -1 (inferred) and 0 (copied) only."""
    return value is not None and value.ndim <= 1 and set(value.reshape(-1).tolist()) <= {-1, 0}


def _attribute(node: onnx.NodeProto, name: str) -> object:
    """``node``'s attribute ``name``; None where it has none."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _same_conv_radius(b: GraphBuilder, node: onnx.NodeProto) -> int | None:
    """How far a 2-D Conv with constant weights, stride 1, no dilation and "same" zero padding reaches from a
    cell (its kernel's radius); None for any other Conv."""
    weights = b.constant_value(node.input[1])
    if weights is None or weights.ndim != 4 or any(k % 2 == 0 for k in weights.shape[2:]):
        return None
    if len(node.input) > 2 and node.input[2] and b.constant_value(node.input[2]) is None:
        return None
    radii = [k // 2 for k in weights.shape[2:]]
    if _attribute(node, "auto_pad") not in (None, b"NOTSET", "NOTSET"):
        return None
    strides, dilations = _attribute(node, "strides") or [1, 1], _attribute(node, "dilations") or [1, 1]
    pads = _attribute(node, "pads") or [0, 0, 0, 0]
    if list(strides) != [1, 1] or list(dilations) != [1, 1] or list(pads) != radii * 2:  # type: ignore[call-overload]
        return None
    return max(radii)
