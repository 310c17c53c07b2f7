"""Property-based test of the exporter: random small ONNX graphs against finite differences.

Hypothesis draws graphs of 2-6 nodes built around a chain (each node takes the previous node's
output) whose other operands are earlier tensors (fan-out, so gradients add up) or new inputs:
element-wise, variadic, reduction, softmax, reshaping, selection and MatMul operators over small
random shapes. Every input is differentiated with ``gradcheck.check_gradients`` (the appended
gradient graph against central finite differences of the forward graph, both run by ONNX Runtime).

Inputs are float64 (fixed-seed normal values); graphs that use an operator ONNX Runtime's CPU
provider has no float64 kernel for are float32 with gradcheck's larger step and a looser
tolerance. A node is only added where the finite differences stay valid: its values (computed
alongside in numpy) keep away from kinks, ties and domain edges by more than the step moves them,
and stay moderate, and every operand keeps some gradient (a Max operand wins somewhere, a Where
condition takes both branches). Deterministic (``derandomize``) and fast: 60 graphs in about a second.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from gradcheck import check_gradients
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import helper

F64, F32 = np.float64, np.float32
MARGIN = {F64: 0.01, F32: 0.2}  # distance kept from kinks and ties: well over step * |Jacobian|
TOLERANCE = {F64: 1e-6, F32: 2e-3}
# Errors are relative to max |reference|, but at least this: a gradient that vanishes in exact
# arithmetic (Softmax along an axis its input is constant on) is compared absolutely.
FLOOR = {F64: 1e-2, F32: 1e-1}
LARGEST = 50.0  # no value above this (Exp, MatMul and Reciprocal chains stay moderate)
MAX_SIZE = 48  # elements per tensor


@dataclass(frozen=True)
class Fresh:
    """A new graph input, added with the node that uses it."""

    name: str
    value: np.ndarray


@dataclass(frozen=True)
class Const:
    """An initializer (axes, shapes, exponents, conditions), added with the node that uses it."""

    value: np.ndarray


Operand = str | Fresh | Const


class Graph:
    """The graph drawn so far, with the numpy (float64) value of every floating tensor."""

    def __init__(self, dtype: type, rng: np.random.Generator) -> None:
        self.dtype, self.rng = dtype, rng
        self.nodes: list[onnx.NodeProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}
        self.current = ""
        self._names = map("x{}".format, itertools.count())  # of new inputs, used or not

    @property
    def x(self) -> np.ndarray:
        return self.values[self.current]

    @property
    def margin(self) -> float:
        return MARGIN[self.dtype]

    def fresh(self, shape: tuple[int, ...]) -> Fresh:
        return Fresh(next(self._names), self.rng.standard_normal(shape).astype(self.dtype))

    def straddling(self) -> Fresh:
        """A new input shaped like the current tensor, above it in some places and below in others."""
        sign = self.rng.choice([-1.0, 1.0], self.x.shape)
        offset = sign * self.rng.uniform(3 * self.margin, 3 * self.margin + 1, self.x.shape)
        return Fresh(next(self._names), np.asarray(self.x + offset).astype(self.dtype))

    def start(self, first: Fresh) -> None:
        self.feeds[first.name], self.values[first.name] = first.value, first.value.astype(np.float64)
        self.current = first.name

    def value(self, operand: Operand) -> np.ndarray:
        return operand.value.astype(np.float64) if isinstance(operand, Fresh) else self.values[operand]  # type: ignore[index]

    def add(self, op: str, operands: list[Operand], outputs: list[np.ndarray], **attrs: object) -> bool:
        """Append ``op`` unless an output is large or empty; its first output becomes ``current``."""
        if any(v.size == 0 or v.size > MAX_SIZE or not np.all(np.abs(v) <= LARGEST) for v in outputs):
            return False
        names = []
        for operand in operands:
            if isinstance(operand, Fresh):
                self.feeds[operand.name] = operand.value
                self.values[operand.name] = operand.value.astype(np.float64)
                names.append(operand.name)
            elif isinstance(operand, Const):
                names.append(f"c{len(self.constants)}")
                self.constants[names[-1]] = operand.value
            else:
                names.append(operand)
        out_names = [f"y{len(self.nodes)}" + (f"_{i}" if len(outputs) > 1 else "") for i in range(len(outputs))]
        self.nodes.append(helper.make_node(op, names, out_names, name=f"{op}_{len(self.nodes)}", **attrs))
        self.values.update(zip(out_names, outputs))
        self.current = out_names[0]
        return True

    def __repr__(self) -> str:
        lines = [f"{self.dtype.__name__}, inputs {({k: v.shape for k, v in self.feeds.items()})}"]
        for node in self.nodes:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            constants = {i: self.constants[i].tolist() for i in node.input if i in self.constants}
            lines.append(f"{list(node.output)} = {node.op_type}({list(node.input)}, {attrs}, {constants})")
        return "\n".join(lines)


Draw = st.DrawFn


# -- operands ------------------------------------------------------------------------------------
def operand_like(draw: Draw, g: Graph, shape: tuple[int, ...]) -> Operand:
    """An earlier tensor or a new input, broadcasting against ``shape`` without growing it."""
    pool = [name for name, v in g.values.items()
            if v.ndim <= len(shape) and all(d in (1, t) for d, t in zip(reversed(v.shape), reversed(shape)))]
    if pool and draw(st.booleans()):
        return draw(st.sampled_from(pool))  # type: ignore[return-value]
    return g.fresh(draw(hnp.broadcastable_shapes(shape, min_dims=0, max_dims=len(shape))))  # type: ignore[arg-type]


def kink_free(*points: float) -> Callable[[Graph], bool]:
    """The current values keep the margin from every point (ReLU-like kinks)."""
    return lambda g: all(np.all(np.abs(g.x - p) > g.margin) for p in points)


def clear_extreme(values: np.ndarray, axes: tuple[int, ...], margin: float, largest: bool) -> bool:
    """Over ``axes`` the largest (smallest) value leads the next by more than ``margin``: no near-tie."""
    signed = values if largest else -values
    kept = signed.ndim - len(axes)
    moved = np.moveaxis(signed, axes, tuple(range(kept, signed.ndim)))
    groups = np.sort(moved.reshape(*moved.shape[:kept], -1), axis=-1)
    return groups.shape[-1] < 2 or bool(np.all(groups[..., -1] - groups[..., -2] > margin))


# -- operators: each appends one node if it may, and says whether it did ----------------------------
def unary(op: str, f: Callable[[np.ndarray], np.ndarray], valid: Callable[[Graph], bool] = lambda g: True,
          **attrs: object) -> Callable[[Draw, Graph], bool]:
    return lambda draw, g: valid(g) and g.add(op, [g.current], [f(g.x)], **attrs)


def binary(op: str, f: Callable[[np.ndarray, np.ndarray], np.ndarray],
           valid: Callable[[np.ndarray], bool] = lambda b: True) -> Callable[[Draw, Graph], bool]:
    """The current tensor and another operand, in either order (``valid`` checks the second)."""
    def add(draw: Draw, g: Graph) -> bool:
        other = operand_like(draw, g, g.x.shape)
        operands = [other, g.current] if draw(st.booleans()) else [g.current, other]
        a, b = (g.value(o) for o in operands)
        return valid(b) and g.add(op, operands, [f(a, b)])
    return add


def variadic(op: str, f: Callable[..., np.ndarray], largest: bool | None = None) -> Callable[[Draw, Graph], bool]:
    """Sum, Mean, Max, Min of the current tensor and one or two other operands."""
    def add(draw: Draw, g: Graph) -> bool:
        operands: list[Operand] = [g.current]
        for _ in range(draw(st.integers(1, 2))):
            straddle = largest is not None and draw(st.booleans())  # so that every operand wins somewhere
            operands.append(g.straddling() if straddle else operand_like(draw, g, g.x.shape))
        stacked = np.stack(np.broadcast_arrays(*[g.value(o) for o in operands]))
        if largest is not None:
            winners = set((stacked.argmax(0) if largest else stacked.argmin(0)).flat)
            if not clear_extreme(stacked, (0,), g.margin, largest) or len(winners) < len(operands):
                return False  # a near-tie, or an operand that never wins (it would get no gradient)
        return g.add(op, operands, [f(stacked, axis=0)])
    return add


def where(draw: Draw, g: Graph) -> bool:
    """A constant condition holding in some places and not in others: both branches take gradient."""
    other = operand_like(draw, g, g.x.shape)
    shape = tuple(d if draw(st.booleans()) else 1 for d in g.x.shape)
    condition = g.rng.random(shape if np.prod(shape) > 1 else g.x.shape) > 0.5
    if condition.size < 2:
        return False
    condition.flat[:2] = True, False
    return g.add("Where", [Const(condition), g.current, other], [np.where(condition, g.x, g.value(other))])


def pow_(draw: Draw, g: Graph) -> bool:
    exponent = draw(st.sampled_from([2, 3]))
    return g.add("Pow", [g.current, Const(np.array(exponent, np.int64))], [g.x ** exponent])


def axes_of(draw: Draw, rank: int) -> list[int]:
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    return [a - rank if draw(st.booleans()) else a for a in axes]  # type: ignore[union-attr]


def reduction(op: str, f: Callable[..., np.ndarray], largest: bool | None = None) -> Callable[[Draw, Graph], bool]:
    def add(draw: Draw, g: Graph) -> bool:
        if g.x.ndim == 0:
            return False
        axes, keepdims = axes_of(draw, g.x.ndim), draw(st.integers(0, 1))
        if largest is not None and not clear_extreme(g.x, tuple(a % g.x.ndim for a in axes), g.margin, largest):
            return False
        out = f(g.x, axis=tuple(axes), keepdims=bool(keepdims))
        return g.add(op, [g.current, Const(np.array(axes, np.int64))], [np.asarray(out)], keepdims=keepdims)
    return add


def softmax(log: bool) -> Callable[[Draw, Graph], bool]:
    def add(draw: Draw, g: Graph) -> bool:
        axes = [a for a, d in enumerate(g.x.shape) if d > 1]  # over one element it is a constant
        if not axes:
            return False
        axis = draw(st.sampled_from(axes)) - (g.x.ndim if draw(st.booleans()) else 0)
        shifted = g.x - g.x.max(axis=axis, keepdims=True)
        log_y = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        return g.add("LogSoftmax" if log else "Softmax", [g.current], [log_y if log else np.exp(log_y)], axis=axis)
    return add


def reshape(draw: Draw, g: Graph) -> bool:
    shape = g.x.shape
    if not shape:
        return False
    target = draw(st.sampled_from([[-1], list(reversed(shape)), [int(np.prod(shape[:2])), *shape[2:]], [0, -1]]))
    out = g.x.reshape([shape[i] if d == 0 else d for i, d in enumerate(target)])
    return g.add("Reshape", [g.current, Const(np.array(target, np.int64))], [out])


def transpose(draw: Draw, g: Graph) -> bool:
    if g.x.ndim < 2:
        return False
    perm = draw(st.permutations(range(g.x.ndim)))
    return g.add("Transpose", [g.current], [g.x.transpose(perm)], perm=list(perm))  # type: ignore[arg-type]


def unsqueeze(draw: Draw, g: Graph) -> bool:
    axis = draw(st.integers(-g.x.ndim - 1, g.x.ndim))
    return g.add("Unsqueeze", [g.current, Const(np.array([axis], np.int64))], [np.expand_dims(g.x, axis)])


def squeeze(draw: Draw, g: Graph) -> bool:
    ones = [i for i, d in enumerate(g.x.shape) if d == 1]
    if not ones:
        return False
    axes = draw(st.lists(st.sampled_from(ones), min_size=1, unique=True))
    return g.add("Squeeze", [g.current, Const(np.array(axes, np.int64))], [np.squeeze(g.x, tuple(axes))])  # type: ignore[arg-type]


def flatten(draw: Draw, g: Graph) -> bool:
    if g.x.ndim == 0:
        return False
    axis = draw(st.integers(0, g.x.ndim))
    return g.add("Flatten", [g.current], [g.x.reshape(int(np.prod(g.x.shape[:axis])), -1)], axis=axis)


def expand(draw: Draw, g: Graph) -> bool:
    shape = [draw(st.integers(2, 3)) if d == 1 else d for d in g.x.shape]
    target = ([2] if draw(st.booleans()) else []) + shape
    return g.add("Expand", [g.current, Const(np.array(target, np.int64))], [np.broadcast_to(g.x, target).copy()])


def concat(draw: Draw, g: Graph) -> bool:
    if g.x.ndim == 0:
        return False
    axis = draw(st.integers(-g.x.ndim, g.x.ndim - 1))
    shape = list(g.x.shape)
    shape[axis] = draw(st.integers(1, 3))
    pool = [name for name, v in g.values.items() if list(v.shape) == shape]
    other: Operand = draw(st.sampled_from(pool)) if pool and draw(st.booleans()) else g.fresh(tuple(shape))  # type: ignore[assignment]
    operands = [g.current, other] + ([g.current] if draw(st.booleans()) else [])
    return g.add("Concat", operands, [np.concatenate([g.value(o) for o in operands], axis)], axis=axis)


def slice_(draw: Draw, g: Graph) -> bool:
    sizable = [i for i, d in enumerate(g.x.shape) if d > 1]
    if not sizable:
        return False
    axis = draw(st.sampled_from(sizable))
    size = g.x.shape[axis]
    start = draw(st.integers(0, size - 1))
    end = draw(st.integers(start + 1, size))
    index = [slice(None)] * g.x.ndim
    index[axis] = slice(start, end)
    ends = end - size if draw(st.booleans()) and end < size else end  # negative ends too
    constants = [Const(np.array([v], np.int64)) for v in (start, ends, axis)]
    return g.add("Slice", [g.current, *constants], [g.x[tuple(index)]])


def split(draw: Draw, g: Graph) -> bool:
    """Two parts: one goes on, the other joins the pool (or stays unused: a zero gradient)."""
    sizable = [i for i, d in enumerate(g.x.shape) if d > 1]
    if not sizable:
        return False
    axis = draw(st.sampled_from(sizable))
    first = draw(st.integers(1, g.x.shape[axis] - 1))
    parts = np.split(g.x, [first], axis)
    sizes = Const(np.array([first, g.x.shape[axis] - first], np.int64))
    if not g.add("Split", [g.current, sizes], parts, axis=axis):
        return False
    g.current = g.nodes[-1].output[draw(st.integers(0, 1))]
    return True


def matmul(draw: Draw, g: Graph) -> bool:
    """The current tensor times a new input, on either side (ranks >= 2, batch dimensions broadcast)."""
    shape = g.x.shape
    if len(shape) < 2:
        return False
    batch = draw(hnp.broadcastable_shapes(shape[:-2], min_dims=0, max_dims=len(shape) - 2)) if len(shape) > 2 else ()
    n = draw(st.integers(1, 3))
    if draw(st.booleans()):
        other = g.fresh((*batch, shape[-1], n))  # type: ignore[misc]
        operands, out = [g.current, other], g.x @ g.value(other)
    else:
        other = g.fresh((*batch, n, shape[-2]))  # type: ignore[misc]
        operands, out = [other, g.current], g.value(other) @ g.x
    return g.add("MatMul", operands, [out])


def clip(draw: Draw, g: Graph) -> bool:
    low, high = draw(st.sampled_from([(-0.5, 1.0), (0.0, 6.0)]))  # ReLU6 too
    if not kink_free(low, high)(g) or not np.any((g.x > low) & (g.x < high)):
        return False
    if g.dtype is F64 and g.nodes and g.nodes[-1].op_type == "Relu":
        return False  # ONNX Runtime's Relu-Clip fusion rejects float64 bounds
    bounds = [Const(np.array(v, g.dtype)) for v in (low, high)]
    return g.add("Clip", [g.current, *bounds], [np.clip(g.x, low, high)])


def leaky_relu(draw: Draw, g: Graph) -> bool:
    alpha = draw(st.sampled_from([0.1, 0.5]))  # not 0.01: float32 differences would drown so small a gradient
    return kink_free(0.0)(g) and g.add("LeakyRelu", [g.current], [np.where(g.x > 0, g.x, alpha * g.x)], alpha=alpha)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


OPS: dict[str, Callable[[Draw, Graph], bool]] = {
    "Neg": unary("Neg", np.negative),
    "Exp": unary("Exp", np.exp, lambda g: bool(np.all(g.x < 3))),
    "Tanh": unary("Tanh", np.tanh),
    "Sigmoid": unary("Sigmoid", sigmoid),
    "Relu": unary("Relu", lambda x: np.maximum(x, 0), lambda g: kink_free(0.0)(g) and bool(np.any(g.x > 0))),
    "Abs": unary("Abs", np.abs, kink_free(0.0)),
    "Log": unary("Log", np.log, lambda g: bool(np.all(g.x > 0.2))),
    "Sqrt": unary("Sqrt", np.sqrt, lambda g: bool(np.all(g.x > 0.2))),
    "Reciprocal": unary("Reciprocal", np.reciprocal, lambda g: bool(np.all(np.abs(g.x) > 0.3))),
    "Clip": clip,
    "Pow": pow_,
    "Add": binary("Add", np.add),
    "Sub": binary("Sub", np.subtract),
    "Mul": binary("Mul", np.multiply),
    "Div": binary("Div", np.divide, lambda b: bool(np.all(np.abs(b) > 0.3))),
    "Where": where,
    "Sum": variadic("Sum", np.sum),
    "Max": variadic("Max", np.max, largest=True),
    "Min": variadic("Min", np.min, largest=False),
    "ReduceSum": reduction("ReduceSum", np.sum),
    "ReduceMean": reduction("ReduceMean", np.mean),
    "ReduceMax": reduction("ReduceMax", np.max, largest=True),
    "ReduceMin": reduction("ReduceMin", np.min, largest=False),
    "Softmax": softmax(log=False),
    "LogSoftmax": softmax(log=True),
    "Reshape": reshape,
    "Transpose": transpose,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
    "Flatten": flatten,
    "Expand": expand,
    "Concat": concat,
    "Slice": slice_,
    "Split": split,
    "MatMul": matmul,
}
# No float64 CPU kernel in ONNX Runtime: only in float32 graphs.
FLOAT32_OPS: dict[str, Callable[[Draw, Graph], bool]] = {
    "LeakyRelu": leaky_relu,
    "Softplus": unary("Softplus", lambda x: np.log1p(np.exp(x))),
    "Erf": unary("Erf", np.vectorize(math.erf, otypes=[np.float64]), lambda g: bool(np.all(np.abs(g.x) < 2))),
    "Mean": variadic("Mean", np.mean),
}


@st.composite
def graphs(draw: Draw) -> Graph:
    """A first input, then operators in a drawn order, each added where it applies, up to 2-6 nodes."""
    dtype = draw(st.sampled_from([F64, F64, F32]))
    g = Graph(dtype, np.random.default_rng(draw(st.integers(0, 2**16))))  # type: ignore[arg-type]
    g.start(g.fresh(draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=3))))  # type: ignore[arg-type]
    ops = {**OPS, **FLOAT32_OPS} if dtype is F32 else OPS
    order = list(g.rng.permutation(sorted(ops)))  # uniform (Hypothesis favours the identity permutation)
    if dtype is F32:  # a float32 graph tries one of the operators it is there for first
        order.insert(0, order.pop(next(i for i, name in enumerate(order) if name in FLOAT32_OPS)))
    size = 6 - draw(st.integers(0, 4))  # the simplest draws are the longest chains
    for name in order:
        if len(g.nodes) == size:
            break
        ops[name](draw, g)
    while len(g.nodes) < 2:
        g.add("Tanh", [g.current], [np.tanh(g.x)])
    return g


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(graphs())
def test_random_graphs_match_finite_differences(graph: Graph) -> None:
    for op in sorted({node.op_type for node in graph.nodes}):
        event(op)  # operator coverage: pytest --hypothesis-show-statistics
    check_gradients(graph.nodes, graph.feeds, graph.current, constants=graph.constants,
                    tolerance=TOLERANCE[graph.dtype], floor=FLOOR[graph.dtype])
