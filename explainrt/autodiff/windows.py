"""Reverse-pass branches run on the window of their feature grid that the cotangent can reach.

A box objective seeds the gradient at the few predictions whose box overlaps the given one. On a detector
scale (YOLOv8's P3: an 80x80 grid at 640x640) the reverse pass through that scale's head spreads those values
only as far as its kernels reach, yet it runs over the whole grid: most of the cost of explaining a box. A
branch that ``run_when_nonzero`` wrapped in an ``If`` for one scale runs instead on the rows and columns from
the first to the last matched cell of the scale, widened by the sum of the branch's kernel radii and clipped
to the grid, and its outputs are padded back with zeros. This is exact: the cotangent is zero outside the
matched cells, and every node a windowed branch may hold keeps what it computes inside the window unchanged:
the cotangent's zeros stay zeros (products, quotients by forward values, sums of cotangents, Neg, Relu, a Where
between the cotangent and 0), forward values are computed cell by cell (any element-wise operator, constants
without a grid extent), the convolutions of the cotangent are "same", stride 1 and without a bias (the head's
Conv3x3 and Conv1x1), so that what they read from outside the window is zero, and reshapes keep the grid as
the last two axes. The one exception is inf or NaN in the forward pass, as for the skipped branches. A branch
with any other node (``_Tracer``), or whose tensors' grid the static shapes do not give, runs on the whole grid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import onnx
from onnx import helper

from explainrt.autodiff.builder import (
    GraphBuilder,
    TensorInfo,
    node_reads,
    sort_topologically,
    tensor_infos,
)
from explainrt.autodiff.zero_branches import ZeroBranches

log = logging.getLogger(__name__)

CELLWISE_OPS = frozenset({"Identity", "Sigmoid", "Relu", "Tanh", "Exp", "Neg", "Mul", "Add", "Sub", "Div", "Sum",
                          "Where", "Cast", "Greater", "Less", "Equal", "Not", "And", "Or"})
"""Operators that compute each grid cell from the same cell of their inputs (on the cotangent, only those of
``_keeps_zeros``)."""


@dataclass(frozen=True)
class _Window:
    """How a branch runs on a window: its grid, how far its kernels reach, and the tensors from outside it
    that are cut to the window (``cells``: gradients whose grid is flattened into their last axis)."""

    grid: tuple[int, int]
    margin: int
    spatial: tuple[str, ...]
    cells: tuple[tuple[str, int, tuple[str, str] | None], ...]  # with its rank and its factors (``_cells_factors``)
    output_ranks: tuple[int, ...]


def run_on_windows(model: onnx.ModelProto, branches: Mapping[str, frozenset[str]],
                   anchors: Mapping[str, tuple[int, int]], matched: str, record: ZeroBranches) -> int:
    """Run each ``If`` branch of ``model`` (``branches``: its name -> its sources, from ``run_when_nonzero``) whose
    sources are one scale's gradients (``anchors``: a source -> that scale's anchors) on the window of the
    scale's grid around the cells ``matched`` [K, N, anchors] (0/1; images and targets in either order) marks,
    where its nodes allow (changed in place); the number of branches so rewritten."""
    try:
        infos = tensor_infos(onnx.shape_inference.infer_shapes(model))
    except onnx.shape_inference.InferenceError as error:
        log.warning("every branch runs on its whole grid: ONNX shape inference failed (%s)", error)
        return 0
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
    its nodes or tensors does not allow it (``_Tracer``)."""
    produced = {o for n in then.node for o in n.output}
    read = {i for n in then.node for i in n.input if i and i not in produced and b.constant_value(i) is None}
    if record.gradient_of.keys() & read - sources or not sources & read:
        return None  # another gradient (non-zero anywhere) comes in; or the branch's own cotangent does not
    grids = {shape[-2:] for name in read - sources - {record.seeds}
             if (shape := _static(infos, name)) is not None and len(shape) >= 3}
    if len(grids) != 1:
        return None
    grid = grids.pop()
    if grid[0] * grid[1] != cells:
        return None
    tracer = _Tracer(b)
    spatial: list[str] = []
    flat: list[tuple[str, int, tuple[str, str] | None]] = []
    for name in sorted(read):
        shape = _static(infos, name) if name not in sources else _gradient_shape(infos, record, name)
        if name == record.seeds:
            tracer.vectors[name] = [_DIM]
        elif shape is not None and len(shape) >= 3 and shape[-2:] == grid:
            spatial.append(name)
            tracer.data[name] = _Data(len(shape), "grid", name in sources)
        elif name in sources and shape is not None and shape[-1] == cells:
            flat.append((name, len(shape), _cells_factors(b, infos, name, len(shape), cells)))
            tracer.data[name] = _Data(len(shape), "cells", True)
        else:
            return None
    if not all(tracer.follow(inner) for inner in then.node):
        return None
    results = [tracer.data.get(output.name) for output in then.output]
    if any(result is None or result.layout != "grid" or not result.carries for result in results):
        return None  # an output padded with zeros must be a gradient, on the grid
    return _Window(grid, tracer.margin, tuple(spatial), tuple(flat), tuple(r.rank for r in results))  # type: ignore[union-attr]


@dataclass(frozen=True)
class _Data:
    """A data tensor of a branch: its rank, whether its last axes are the grid's rows and columns ("grid") or
    its cells flattened row by row ("cells"), and whether it carries the cotangent (is linear in it, so zero
    wherever the cotangent is zero), as opposed to a value of the forward pass."""

    rank: int
    layout: str
    carries: bool


_DIM, _ROWS, _COLUMNS, _CELLS, _INFERRED = "dim", "rows", "columns", "cells", -1
"""Elements of a shape vector: a dimension the window does not change, the grid's rows and columns, its cells
flattened, and a Reshape's -1."""


class _Tracer:
    """Follows a branch's nodes, tracking each tensor's ``_Data`` and each shape vector's elements, and refuses
    (``follow`` is False) a node that would compute something else on a window than on the grid, or that the
    margin does not cover: its sum of convolution radii (the cotangent's reach)."""

    def __init__(self, b: GraphBuilder) -> None:
        self.b = b
        self.data: dict[str, _Data] = {}
        self.vectors: dict[str, list[object]] = {}
        self.margin = 0

    def follow(self, node: onnx.NodeProto) -> bool:
        op = node.op_type
        if op == "Shape":
            return self._shape(node)
        if op in ("Slice", "Concat"):
            return self._vector(node)
        if any(i in self.vectors for i in node.input[:1]):
            return False  # shape vectors go only into Slice, Concat and a Reshape's target
        if op == "Reshape":
            return self._reshape(node)
        if op in ("Unsqueeze", "Squeeze"):
            axes = self.b.constant_value(node.input[1]) if len(node.input) > 1 else None
            given = self.data.get(node.input[0])
            if given is None or axes is None or axes.reshape(-1).tolist() != [0]:
                return False
            self.data[node.output[0]] = _Data(given.rank + (1 if op == "Unsqueeze" else -1), given.layout, given.carries)
            return True
        if op == "Conv":
            return self._conv(node)
        if op in CELLWISE_OPS:
            return self._cellwise(node)
        return False

    def _shape(self, node: onnx.NodeProto) -> bool:
        given = self.data.get(node.input[0])
        if given is None or node.attribute:  # a constant's shape is the grid's, not the window's; start/end
            return False
        if given.layout == "grid":
            self.vectors[node.output[0]] = [_DIM] * (given.rank - 2) + [_ROWS, _COLUMNS]
        else:
            self.vectors[node.output[0]] = [_DIM] * (given.rank - 1) + [_CELLS]
        return True

    def _vector(self, node: onnx.NodeProto) -> bool:
        """Slice and Concat of shape vectors (constants: -1 only), with their elements followed."""
        constants = [self.b.constant_value(i) for i in node.input]
        if node.op_type == "Concat":
            parts: list[list[object]] = []
            for name, value in zip(node.input, constants):
                if name in self.vectors:
                    parts.append(self.vectors[name])
                elif value is not None and value.ndim == 1 and set(value.tolist()) <= {-1}:
                    parts.append([_INFERRED] * value.size)
                else:
                    return False
            self.vectors[node.output[0]] = [element for part in parts for element in part]
            return True
        if node.input[0] not in self.vectors or any(v is None for v in constants[1:]) \
                or any(v.size != 1 for v in constants[1:]):  # type: ignore[union-attr]
            return False
        bounds = [int(v.reshape(-1)[0]) for v in constants[1:]]  # type: ignore[union-attr]
        if len(bounds) > 2 and bounds[2] != 0 or len(bounds) > 3 and bounds[3] != 1:
            return False  # an axis other than 0, or a step
        vector = self.vectors[node.input[0]]
        self.vectors[node.output[0]] = vector[slice(*(max(min(v, len(vector)), -len(vector) - 1) for v in bounds[:2]))]
        return True

    def _reshape(self, node: onnx.NodeProto) -> bool:
        """A Reshape to a shape vector ending in the grid's rows and columns, which appear nowhere else: the grid
        (or the cells it was flattened to, row by row) stays the last axes; the leading axes may regroup."""
        given, target = self.data.get(node.input[0]), self.vectors.get(node.input[1])
        if given is None or target is None or target[-2:] != [_ROWS, _COLUMNS] \
                or any(e in (_ROWS, _COLUMNS, _CELLS) for e in target[:-2]) or target.count(_INFERRED) > 1:
            return False
        self.data[node.output[0]] = _Data(len(target), "grid", given.carries)
        return True

    def _conv(self, node: onnx.NodeProto) -> bool:
        """A "same" stride-1 convolution of the cotangent, without a bias (a constant added everywhere)."""
        given = self.data.get(node.input[0])
        radius = _same_conv_radius(self.b, node)
        bias = self.b.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if given is None or not given.carries or given.layout != "grid" or given.rank != 4 or radius is None \
                or (bias is not None and bias.any()):
            return False
        self.margin += radius
        self.data[node.output[0]] = _Data(4, "grid", True)
        return True

    def _cellwise(self, node: onnx.NodeProto) -> bool:
        """A cell-wise operator: on values of the forward pass, any; on the cotangent, only one that keeps its
        zeros (``_keeps_zeros``)."""
        ranks, carrying, zeros = [], [], []
        for position, name in enumerate(node.input):
            value = self.b.constant_value(name) if name else None
            if value is not None:
                if any(d != 1 for d in value.shape[-2:]):
                    return False  # it would broadcast against the window's rows or columns
                ranks.append(value.ndim)
                if not value.any():
                    zeros.append(position)
                continue
            given = self.data.get(name)
            if given is None or given.layout != "grid":
                return False
            ranks.append(given.rank)
            if given.carries:
                carrying.append(position)
        if carrying and not _keeps_zeros(node, carrying, zeros):
            return False
        self.data[node.output[0]] = _Data(max(ranks), "grid", bool(carrying))
        return True


def _keeps_zeros(node: onnx.NodeProto, carrying: list[int], zeros: list[int]) -> bool:
    """Whether ``node``'s output is zero wherever its inputs that carry the cotangent (positions ``carrying``)
    are: a product, a quotient by a forward value, a sum of cotangents, Neg, Relu, a Where choosing between
    cotangents and zeros on a forward condition."""
    op = node.op_type
    if op in ("Mul", "Neg", "Identity", "Relu", "Cast"):
        return True
    if op == "Div":
        return carrying == [0]
    if op in ("Add", "Sub", "Sum"):
        return carrying == list(range(len(node.input)))
    if op == "Where":
        return 0 not in carrying and all(p in carrying or p in zeros for p in (1, 2))
    return False


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

    def add(op_type: str, inputs: list[str], hint: str, **attributes: int) -> str:
        output = b.fresh(hint)
        inside.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    window_size: str | None = None  # made where a shape needs it, as the padding's ``remaining`` below
    for name in window.spatial:
        readers = [inner for inner in then.node if name in inner.input]
        if readers and all(inner.op_type == "Shape" for inner in readers):
            # read for its window's shape alone: that shape is its own leading axes and the window's size, with no
            # copy of the data (ONNX Runtime converts a convolution's blocked output for any reader; the Shape of a
            # forward tensor becomes constants and the image's batch, ``shapes_from_the_image``)
            lead = add("Slice", [add("Shape", [name], f"{b.scope}/{name}/whole"), b.ints([0]), b.ints([-2])],
                       f"{b.scope}/{name}/leading")
            window_size = window_size or b.op("Sub", [high, low])
            window_shape = add("Concat", [lead, window_size], f"{b.scope}/{name}/shape", axis=0)
            for inner in readers:
                inner.op_type = "Identity"
                inner.input[:] = [window_shape]
            continue
        renamed[name] = add("Slice", [name, low, high, axes], f"{b.scope}/{name}")
    products = []
    for name, rank, factors in window.cells:
        varying = name if factors is None else factors[1]
        as_grid = add("Reshape", [varying, b.ints([0] * (rank - 1) + [height, width])], f"{b.scope}/{name}/grid")
        cut = add("Slice", [as_grid, low, high, axes], f"{b.scope}/{name}/cut")
        renamed[name] = add("Reshape", [cut, b.ints([0] * (rank - 1) + [-1])], f"{b.scope}/{name}")
        if factors is not None:  # the product made on the window's cells alone
            renamed[name] = add("Mul", [factors[0], renamed[name]], f"{b.scope}/{name}/product")
            products.append(name)
    padded: list[onnx.NodeProto] = []
    remaining: str | None = None
    for leaving, output, rank in zip(node.output, then.output, window.output_ranks):
        tables = _tap_sums(b, leaving)
        if tables is not None:
            # read only by constant tables summing over the grid (a map head's Conv shortcut): the tables cut to
            # the window instead of the output padded. The else branch's zeros cover the whole grid, which is the
            # window when no cell matched (the last index of an all-zero line is the grid's last)
            across, down = tables
            across.input[1] = b.op("Slice", [across.input[1], _element(b, low, 1), _element(b, high, 1), b.ints([0])])
            down.input[0] = b.op("Slice", [down.input[0], _element(b, low, 0), _element(b, high, 0), b.ints([1])])
            continue
        zeros = [b.ints([0] * (rank - 2))] if rank > 2 else []
        remaining = remaining or b.op("Sub", [b.ints([height, width]), high])
        pads = b.concat([*zeros, low, *zeros, remaining], 0)
        renamed[output.name] = b.fresh(f"{output.name}/window")
        padded.append(helper.make_node("Pad", [renamed[output.name], pads], [output.name],
                                       name=b.fresh(f"{output.name}/Pad")))
    for inner in then.node:
        inner.input[:] = [renamed.get(i, i) for i in inner.input]
        inner.output[:] = [renamed.get(o, o) for o in inner.output]
    nodes = [*inside, *then.node, *padded]
    del then.node[:]
    then.node.extend(nodes)
    for name in products:  # the product on the whole grid, if nothing else reads it
        if not any(name in node_reads(other) for other in b.graph.node):
            b.graph.node.remove(next(other for other in b.graph.node if name in other.output))


def _cells_factors(b: GraphBuilder, infos: dict[str, TensorInfo], name: str, rank: int,
                   cells: int) -> tuple[str, str] | None:
    """(a, v) where the branch's input ``name`` [..., cells] is Mul(a, v), a of the same rank and of size 1 on the
    cells axis, v of the same rank (a box seed's part for one scale: the class rows times that scale's matches): the
    window then cuts v and multiplies, no product on the whole grid. None for any other input."""
    producer = next((node for node in b.graph.node if name in node.output), None)
    if producer is None or producer.op_type != "Mul":
        return None
    for a, v in (tuple(producer.input), tuple(reversed(producer.input))):
        given, varying = infos.get(a), infos.get(v)
        if given is not None and varying is not None and given.rank == varying.rank == rank \
                and given.shape[-1] == 1 and varying.shape[-1] == cells:  # type: ignore[index]
            return a, v
    return None


def _tap_sums(b: GraphBuilder, name: str) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The MatMuls ``rows @ (name @ columns)`` with constant 2-D tables that alone read ``name`` [..., H, W] (the
    sums over a Conv's input positions of a map head's ``_conv_input_mean``), else None."""
    def sole_reader(tensor: str) -> onnx.NodeProto | None:
        readers = [n for n in b.graph.node if tensor in node_reads(n)]
        outputs = {o.name for o in b.graph.output}
        return readers[0] if len(readers) == 1 and readers[0].op_type == "MatMul" and tensor not in outputs else None

    across = sole_reader(name)
    if across is None or across.input[0] != name or not _is_table(b, across.input[1]):
        return None
    down = sole_reader(across.output[0])
    if down is None or down.input[1] != across.output[0] or not _is_table(b, down.input[0]):
        return None
    return across, down


def _is_table(b: GraphBuilder, name: str) -> bool:
    value = b.constant_value(name)
    return value is not None and value.ndim == 2


def _element(b: GraphBuilder, vector: str, index: int) -> str:
    """Element ``index`` of a 1-D tensor, as a 1-D tensor (a Slice's start or end)."""
    return b.op("Slice", [vector, b.ints([index]), b.ints([index + 1])])


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
