"""Reverse-mode differentiation of an ONNX graph, written back into the graph as ONNX operators.

``append_gradients`` walks the nodes between the tensors to differentiate (``wrt``) and the
tensor whose cotangent is given (``of``) in reverse topological order, sums fan-in gradients and
calls one VJP rule per node from the table it is given (``explainrt.autodiff.rules.RULES``). It knows no operator by name.

Layout: a gradient carries one extra leading axis, the *seed* axis: the gradient of a tensor of
shape S is ``[K, *S]``, one slice per cotangent given for ``of``. Forward tensors broadcast
against it from the right, so element-wise rules need no reshaping and K seeds (K target classes)
cost one graph, not K.

Rules are written over value handles (``V``), whose Python operators append ONNX nodes, so that a
rule reads like its math: Sigmoid's is ``g * (y * (1 - y))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from explainrt.autodiff.builder import Dim, GraphBuilder, TensorInfo
from explainrt.errors import InvalidModelError, UnsupportedOperatorError

GRADIENT_SEEDS = "explainrt/grad/seeds"
"""The node (and its output) giving the length K of the seed axis, [K], that every gradient's size starts with."""

Shape = tuple[Dim, ...] | None


# -- value handles ---------------------------------------------------------------------------------
def _elementwise(op_type: str) -> Callable[[V], V]:
    """A method of V applying the element-wise ONNX operator ``op_type`` (``x.exp()``, ``x.sqrt()``, ...)."""
    def apply(self: V) -> V:
        return self._unary(op_type)

    apply.__name__ = op_type.lower()
    return apply


class V:
    """A handle on one tensor of the graph being built: its Python operators append ONNX nodes.

    ``info`` holds the element type and the *per-seed* shape: a gradient (``seeded``: it has the
    leading seed axis) is described by the shape of the forward tensor it is the gradient of.
    Axes are negative, counted from the end, so they mean the same with and without the seed
    axis. A number (or numpy array) operand becomes a constant of the other operand's type.
    """

    __slots__ = ("_info", "b", "name", "seeded")

    def __init__(self, b: GradientBuilder, name: str, info: TensorInfo | None = None, seeded: bool = False) -> None:
        self.b, self.name, self.seeded, self._info = b, name, seeded, info

    def __repr__(self) -> str:
        return f"V({self.name!r}{', seeded' if self.seeded else ''})"

    def __bool__(self) -> bool:
        raise TypeError(f"{self!r} is a graph value: it has no truth value (test `is None`)")

    # -- static facts ---------------------------------------------------------------------------
    @property
    def info(self) -> TensorInfo:
        return self._info if self._info is not None else self.b.info(self.name)

    @property
    def dtype(self) -> int:
        return self.info.elem_type

    @property
    def shape(self) -> tuple[Dim, ...]:
        shape = self.info.shape
        if shape is None:
            raise InvalidModelError(f"ONNX shape inference could not find the shape of {self.name!r}")
        return shape

    @property
    def rank(self) -> int:
        return len(self.shape)

    # -- building -------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: V | str, info: TensorInfo | None = None, **attrs: object) -> V:
        """``op_type(self, *inputs)``, for operators without a method; typed like ``self`` unless ``info``."""
        return _apply(op_type, [self, *inputs], self.info if info is None else info, **attrs)

    def _lift(self, other: Operand) -> V:
        return other if isinstance(other, V) else V(self.b, self.b.constant(other, dtype=self.dtype))

    def _binary(self, op_type: str, other: Operand, reverse: bool = False, dtype: int | None = None) -> V:
        first, second = (self._lift(other), self) if reverse else (self, self._lift(other))
        shape = _broadcast(first.info.shape, second.info.shape)
        return _apply(op_type, [first, second], TensorInfo(self.dtype if dtype is None else dtype, shape))

    def _unary(self, op_type: str, **attrs: object) -> V:
        return _apply(op_type, [self], self.info, **attrs)

    # -- element-wise arithmetic ------------------------------------------------------------------
    def __add__(self, other: Operand) -> V:
        return self._binary("Add", other)

    def __radd__(self, other: Operand) -> V:
        return self._binary("Add", other, reverse=True)

    def __sub__(self, other: Operand) -> V:
        return self._binary("Sub", other)

    def __rsub__(self, other: Operand) -> V:
        return self._binary("Sub", other, reverse=True)

    def __mul__(self, other: Operand) -> V:
        return self if _is_one(other) else self._binary("Mul", other)

    def __rmul__(self, other: Operand) -> V:
        return self if _is_one(other) else self._binary("Mul", other, reverse=True)

    def __truediv__(self, other: Operand) -> V:
        return self if _is_one(other) else self._binary("Div", other)

    def __rtruediv__(self, other: Operand) -> V:
        return self._binary("Div", other, reverse=True)

    def __pow__(self, other: Operand) -> V:
        return self._binary("Pow", other)

    def __neg__(self) -> V:
        return self._unary("Neg")

    def __matmul__(self, other: V) -> V:
        a, c = self.info.shape, other.info.shape
        batch = None if a is None or c is None else _broadcast(a[:-2], c[:-2])
        shape = None if batch is None else (*batch, a[-2], c[-1])  # type: ignore[index]
        return _apply("MatMul", [self, other], TensorInfo(self.dtype, shape))

    # -- comparisons and logic (boolean handles) -----------------------------------------------------
    def __eq__(self, other: Operand) -> V:  # type: ignore[override]
        return self._binary("Equal", other, dtype=TensorProto.BOOL)

    def __gt__(self, other: Operand) -> V:
        return self._binary("Greater", other, dtype=TensorProto.BOOL)

    def __lt__(self, other: Operand) -> V:
        return self._binary("Less", other, dtype=TensorProto.BOOL)

    def __le__(self, other: Operand) -> V:
        return self._binary("LessOrEqual", other, dtype=TensorProto.BOOL)

    __hash__ = None  # type: ignore[assignment]  # == builds a node

    def __and__(self, other: V) -> V:
        return self._binary("And", other)

    def __or__(self, other: V) -> V:
        return self._binary("Or", other)

    def __invert__(self) -> V:
        return self._unary("Not")

    # -- element-wise functions ------------------------------------------------------------------
    exp, sqrt, reciprocal = _elementwise("Exp"), _elementwise("Sqrt"), _elementwise("Reciprocal")
    tanh, sigmoid, erf, sign = _elementwise("Tanh"), _elementwise("Sigmoid"), _elementwise("Erf"), _elementwise("Sign")

    def cast(self, dtype: int) -> V:
        return _apply("Cast", [self], TensorInfo(dtype, self.info.shape), to=dtype)

    # -- axes --------------------------------------------------------------------------------------
    def sum(self, axes: Sequence[int], keepdims: bool = True) -> V:
        return self._reduce("ReduceSum", axes, keepdims)

    def mean(self, axes: Sequence[int], keepdims: bool = True) -> V:
        return self._reduce("ReduceMean", axes, keepdims)

    def _reduce(self, op_type: str, axes: Sequence[int], keepdims: bool) -> V:
        axes = _from_end(axes)
        if not axes:  # ONNX would read no axes as all of them
            return self
        shape = self.info.shape
        if shape is not None:
            picked = {len(shape) + a for a in axes}
            shape = tuple(1 if i in picked else d for i, d in enumerate(shape) if keepdims or i not in picked)
        return _wrap(self.b, self.b.reduce(op_type, self.name, axes, keepdims), TensorInfo(self.dtype, shape), self.seeded)

    def unsqueeze(self, axes: Sequence[int]) -> V:
        """Size-1 axes inserted at ``axes`` (counted from the end of the result)."""
        axes = _from_end(axes)
        if not axes:
            return self
        shape = self.info.shape
        if shape is not None:
            rank, rest = len(shape) + len(axes), iter(shape)
            shape = tuple(1 if i - rank in axes else next(rest) for i in range(rank))
        return _wrap(self.b, self.b.unsqueeze(self.name, axes), TensorInfo(self.dtype, shape), self.seeded)

    def transpose(self, perm: Sequence[int]) -> V:
        """Axes reordered by ``perm`` (of the per-seed axes: a gradient's seed axis stays first)."""
        shape = self.info.shape
        shape = None if shape is None else tuple(shape[p] for p in perm)
        full = [0, *(p + 1 for p in perm)] if self.seeded else list(perm)
        return _apply("Transpose", [self], TensorInfo(self.dtype, shape), perm=full)

    @property
    def mT(self) -> V:
        """The last two axes swapped (a batch of matrices transposed)."""
        rank = self.rank
        return self.transpose([*range(rank - 2), rank - 1, rank - 2])

    # -- gradients: the shape of a forward value -----------------------------------------------------
    def unbroadcast(self, x: V) -> V:
        """This gradient summed down to ``[K, *shape(x)]``: undoes broadcasting (JAX's ``_unbroadcast``).

        Axes ``x`` lacks are summed away, as are axes where ``x`` has a static 1 and this value
        does not (summing an axis that turns out to be 1 as well changes nothing).
        """
        shape, x_shape = self.shape, x.shape
        lead = list(range(-len(shape), -len(x_shape)))
        ones = [i - len(x_shape) for i, (dim_x, dim) in enumerate(zip(x_shape, shape[len(lead):]))
                if dim_x == 1 and dim != 1]
        info = TensorInfo(self.dtype, x_shape)
        if not lead and not ones:
            return V(self.b, self.name, info, self.seeded)
        summed = self.sum(lead + ones)
        return _wrap(self.b, self.b.squeeze(summed.name, lead) if lead else summed.name, info, self.seeded)

    def reshape_like(self, x: V) -> V:
        """This gradient (or a seed-merged one, ``[K*N, ...]``) reshaped to ``[K, *shape(x)]``."""
        return _wrap(self.b, self.b.op("Reshape", [self.name, self.b.grad_shape(x.name)]), x.info, seeded=True)

    def expand_like(self, x: V) -> V:
        """This gradient broadcast to ``[K, *shape(x)]``."""
        return _wrap(self.b, self.b.op("Expand", [self.name, self.b.grad_shape(x.name)]), x.info, seeded=True)


Operand = V | float | np.ndarray


def where(condition: V, x: Operand, y: Operand) -> V:
    """``x`` where ``condition`` holds, else ``y`` (a number takes the other operand's type)."""
    like = x if isinstance(x, V) else y
    if not isinstance(like, V):
        raise TypeError("where needs a graph value for x or y")
    x, y = like._lift(x), like._lift(y)
    shape = _broadcast(condition.info.shape, _broadcast(x.info.shape, y.info.shape))
    return _apply("Where", [condition, x, y], TensorInfo(like.dtype, shape))


def add_n(values: Sequence[V]) -> V:
    """The element-wise sum of one or more values (one ONNX Sum)."""
    if len(values) == 1:
        return values[0]
    shape: Shape = ()
    for value in values:
        shape = _broadcast(shape, value.info.shape)
    return _apply("Sum", values, TensorInfo(values[0].dtype, shape))


def _apply(op_type: str, inputs: Sequence[V | str], info: TensorInfo, **attrs: object) -> V:
    handles = [i for i in inputs if isinstance(i, V)]
    b = handles[0].b
    name = b.op(op_type, [i.name if isinstance(i, V) else i for i in inputs], **attrs)
    return _wrap(b, name, info, any(h.seeded for h in handles))


def _wrap(b: GradientBuilder, name: str, info: TensorInfo, seeded: bool) -> V:
    """A handle on a tensor just built; its type and shape are recorded for ``b.info`` too."""
    b.infos[name] = info
    return V(b, name, info, seeded)


def _broadcast(a: Shape, b: Shape) -> Shape:
    """The static shape of ``a`` and ``b`` broadcast together (a dimension is None where unknown)."""
    if a is None or b is None:
        return None
    rank = max(len(a), len(b))
    dims = []
    for pair in zip((1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)):
        known = [d for d in pair if d != 1]
        if not known:
            dims.append(1)
        elif len(set(known)) == 1:
            dims.append(known[0])
        else:  # a symbolic or unknown dimension against another: a static size wins
            dims.append(next((d for d in known if isinstance(d, int)), None))
    return tuple(dims)


def _from_end(axes: Sequence[int]) -> list[int]:
    if any(a >= 0 for a in axes):
        raise ValueError(f"axes {list(axes)}: count them from the end (negative), seed axis or not")
    return list(axes)


def _is_one(value: object) -> bool:
    return isinstance(value, int | float) and value == 1


# -- what rules see --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """A read-only view of one forward node, as rules see it: names, attributes and value handles."""

    proto: onnx.NodeProto
    b: GradientBuilder
    attrs: dict[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, proto: onnx.NodeProto, b: GradientBuilder) -> Node:
        return cls(proto, b, {a.name: helper.get_attribute_value(a) for a in proto.attribute})

    @property
    def op_type(self) -> str:
        return self.proto.op_type

    @property
    def name(self) -> str:
        return self.proto.name or self.proto.output[0]

    @property
    def inputs(self) -> list[str]:
        return list(self.proto.input)

    @property
    def outputs(self) -> list[str]:
        return list(self.proto.output)

    @property
    def x(self) -> list[V | None]:
        """The inputs as handles (None for an omitted optional input)."""
        return [self.input(i) for i in range(len(self.proto.input))]

    @property
    def y(self) -> list[V | None]:
        """The outputs as handles (None for an omitted optional output)."""
        return [V(self.b, name) if name else None for name in self.proto.output]

    def input(self, index: int) -> V | None:
        """Input ``index`` as a handle; None where the node does not have it."""
        names = self.proto.input
        return V(self.b, names[index]) if index < len(names) and names[index] else None

    def attr(self, key: str, default: object = None) -> object:
        value = self.attrs.get(key, default)
        return value.decode() if isinstance(value, bytes) else value

    def unsupported(self, detail: str) -> UnsupportedOperatorError:
        return UnsupportedOperatorError(self.op_type, self.name, detail)


Rule = Callable[[Node, Sequence[V | None]], Sequence[V | None]]
"""A VJP rule: the node and its outputs' gradients (None where none flows) -> one gradient per input."""


def through_integers(rule: Rule) -> Rule:
    """Mark ``rule`` as giving its operator's integer outputs a gradient (QuantizeLinear's
    straight-through estimator): they stay on the path, which integer tensors otherwise leave."""
    rule.through_integers = True  # type: ignore[attr-defined]
    return rule


def blocks_path(rule: Rule) -> Rule:
    """Mark ``rule`` (one that raises) to be run on every node between ``wrt`` and ``of``, even one
    reached only through integer tensors, which otherwise cut a node off the path silently."""
    rule.blocks_path = True  # type: ignore[attr-defined]
    return rule


@dataclass(frozen=True)
class Product:
    """A cotangent built as the product ``constant * varying`` of two factors with every axis of the product,
    ``constant`` of size 1 on ``axes`` (negative, from the end) and ``varying`` with the seed axis in full: a
    Split along one of ``axes`` splits ``varying`` alone and multiplies each part, where that part is read (a
    box objective's seed: the class's rows times the matched predictions, split by detector scale)."""

    constant: str
    varying: str
    axes: tuple[int, ...]


class GradientBuilder(GraphBuilder):
    """GraphBuilder plus what gradients share: the seed axis and shapes with it."""

    seeds: str  # 1-D int64 [K]: the length of the seed axis
    products: dict[str, Product]  # cotangents built as a ``Product`` (the rules may split them factor by factor)
    # what the reverse pass built, for passes that rewrite it (``zero_branches``): the gradient tensor ->
    # (the forward tensor it is the gradient of, merged to [K*N, ...]); a forward node -> its inputs' gradients
    gradient_of: dict[str, tuple[str, bool]]
    node_gradients: dict[str, list[str | None]]

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.products = {}

    def grad_shape(self, x: str) -> str:
        """Runtime shape ``[K, *shape(x)]`` of the gradient of forward tensor ``x``."""
        return self.op("Concat", [self.seeds, self.shape(x)], axis=0)

    def zeros_grad(self, x: str) -> str:
        """A zero gradient for forward tensor ``x``."""
        return self.op("Expand", [self.scalar_like(0.0, x), self.grad_shape(x)], like=x)

    def merge_seeds(self, g: str, y: str) -> str:
        """``[K, N, ...]`` -> ``[K*N, ...]`` for operators of fixed rank (Conv, pooling).

        The shape comes from ``g``, not ``y``: a new consumer of a Conv output would keep ONNX
        Runtime from fusing the Conv with what follows, and the original outputs would change.
        """
        merged = self.op("Reshape", [g, self.concat([self.ints([-1]), self.shape_slice(g, 2)], 0)], like=y)
        self.gradient_of.setdefault(merged, (y, True))
        return merged


# -- the driver ------------------------------------------------------------------------------------
def ancestors(graph: onnx.GraphProto, of: str, stop: str | None = None) -> set[str]:
    """Every tensor ``of`` depends on, itself included; ``stop`` is reached but not looked past."""
    producers = {out: node for node in graph.node for out in node.output}
    found: set[str] = set()
    stack = [of]
    while stack:
        value = stack.pop()
        if value in found:
            continue
        found.add(value)
        if value in producers and value != stop:
            stack.extend(i for i in producers[value].input if i)
    return found


def _path_values(graph: onnx.GraphProto, wrt: Sequence[str], of: str, builder: GraphBuilder,
                 rules: Mapping[str, Rule]) -> set[str]:
    """Float tensors (and the integer outputs of rules marked ``through_integers``) that depend on
    some ``wrt`` tensor and that ``of`` depends on. A node marked ``blocks_path`` anywhere between
    them, through tensors of any type, has its rule run here (to raise its explanation)."""
    descendants, reached = set(wrt), set(wrt)
    upstream = ancestors(graph, of)
    for node in graph.node:
        if any(i in reached for i in node.input):
            reached.update(o for o in node.output if o)
            rule = rules.get(node.op_type)
            if getattr(rule, "blocks_path", False) and any(o in upstream for o in node.output):
                rule(Node.of(node, builder), [])  # type: ignore[misc]
        if any(i in descendants for i in node.input):
            carries = getattr(rules.get(node.op_type), "through_integers", False)
            descendants.update(o for o in node.output if o and (carries or _maybe_float(builder, o)))
    return descendants & upstream


def _maybe_float(builder: GraphBuilder, name: str) -> bool:
    """Floating tensors carry gradients; untyped ones are kept so their rule fails loudly."""
    info = builder.infos.get(name)
    return info is None or info.is_float


def append_gradients(builder: GradientBuilder, wrt: Sequence[str], of: str, seed: str,
                     rules: Mapping[str, Rule]) -> dict[str, str]:
    """Append the graph of ``seed``'s vector-Jacobian products with respect to each ``wrt``.

    ``seed`` has shape ``[K, *shape(of)]``; the returned tensor for ``x`` in ``wrt`` has shape
    ``[K, *shape(x)]``: its k-th slice is the gradient of ``sum(seed[k] * of)`` w.r.t. ``x``.
    ``rules`` maps operator types to VJP rules (``explainrt.autodiff.rules.RULES``, possibly with
    some replaced, e.g. FGVis's defended Relu); the driver itself knows no operator.
    """

    graph = builder.graph
    on_path = _path_values(graph, wrt, of, builder, rules)
    unreached = [x for x in wrt if x not in on_path]
    if unreached:
        raise InvalidModelError(f"{of!r} does not depend on {unreached}: no gradient flows there")
    product = builder.products.get(seed)
    # a product's seed axis is read from its varying factor: a Shape of the product would keep it whole
    builder.seeds = builder.op("Slice", [builder.shape(seed if product is None else product.varying), builder.ints([0]),
                                         builder.ints([1])], name=GRADIENT_SEEDS)
    builder.gradient_of, builder.node_gradients = {seed: (of, False)}, {}
    contributions: dict[str, list[str]] = {of: [seed]}
    path_nodes = [n for n in graph.node if any(o in on_path for o in n.output)
                  and any(i in on_path for i in n.input)]
    for proto in reversed(path_nodes):
        node = Node.of(proto, builder)
        incoming = [contributions.get(o) for o in node.outputs]
        if not any(incoming):
            continue
        if node.proto.domain not in ("", "ai.onnx"):
            raise node.unsupported(f"custom domain {node.proto.domain!r}")
        rule = rules.get(node.op_type)
        if rule is None:
            raise node.unsupported("add a VJP rule to explainrt.autodiff.rules")
        builder.scope = f"explainrt/grad/{node.name}"
        output_grads = [V(builder, _total(builder, o, terms), builder.info(o), seeded=True) if terms else None
                        for o, terms in zip(node.outputs, incoming)]
        input_grads = list(rule(node, output_grads))
        input_grads += [None] * (len(node.inputs) - len(input_grads))
        builder.node_gradients[node.name] = [gx.name if gx is not None and x in on_path else None
                                             for x, gx in zip(node.inputs, input_grads)]
        for index, (x, gx) in enumerate(zip(node.inputs, input_grads)):
            if x not in on_path:
                continue
            if gx is None:
                raise node.unsupported(f"no gradient with respect to input {index} ({x!r})")
            builder.gradient_of.setdefault(gx.name, (x, False))
            contributions.setdefault(x, []).append(gx.name)
    builder.scope = "explainrt/grad"
    return {x: _total(builder, x, contributions[x]) for x in wrt}


def _total(builder: GradientBuilder, value: str, terms: list[str]) -> str:
    """Sum the fan-in of one tensor's gradient (once; later calls reuse it)."""
    if len(terms) == 1:
        return terms[0]
    total = builder.op("Sum", terms, name=f"explainrt/grad/{value}", like=value)
    builder.gradient_of[total] = (value, False)
    terms[:] = [total]
    return total
