"""Reverse-mode differentiation of an ONNX graph, written back into the graph as ONNX operators.

``append_gradients`` walks the nodes between the tensors to differentiate (``wrt``) and the
tensor whose cotangent is given (``of``) in reverse topological order, sums fan-in gradients and
calls one VJP rule per node from the table it is given (``explainrt.export.rules.RULES``). It knows no operator by name.

Layout: a gradient carries one extra leading axis, the *seed* axis: the gradient of a tensor of
shape S is ``[K, *S]``, one slice per cotangent given for ``of``. Forward tensors broadcast
against it from the right, so element-wise rules need no reshaping and K seeds (K target classes)
cost one graph, not K.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import helper

from explainrt.errors import InvalidModelError, UnsupportedOperatorError
from explainrt.export.builder import Dim, GraphBuilder


@dataclass(frozen=True)
class Node:
    """A read-only view of one forward node, as rules see it."""

    proto: onnx.NodeProto
    attrs: dict[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, proto: onnx.NodeProto) -> Node:
        return cls(proto, {a.name: helper.get_attribute_value(a) for a in proto.attribute})

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

    def attr(self, key: str, default: object = None) -> object:
        value = self.attrs.get(key, default)
        return value.decode() if isinstance(value, bytes) else value

    def unsupported(self, detail: str) -> UnsupportedOperatorError:
        return UnsupportedOperatorError(self.op_type, self.name, detail)


class GradientBuilder(GraphBuilder):
    """GraphBuilder plus the helpers gradient rules share (seed axis, broadcasting, shapes)."""

    seeds: str  # 1-D int64 [K]: the length of the seed axis

    def grad_shape(self, x: str) -> str:
        """Runtime shape ``[K, *shape(x)]`` of the gradient of forward tensor ``x``."""
        return self.op("Concat", [self.seeds, self.shape(x)], axis=0)

    def like_input(self, g: str, x: str) -> str:
        """Reshape a gradient back to ``[K, *shape(x)]`` (rules of reshaping operators)."""
        return self.op("Reshape", [g, self.grad_shape(x)], like=x)

    def zeros_grad(self, x: str) -> str:
        """A zero gradient for forward tensor ``x``."""
        return self.op("Expand", [self.scalar_like(0.0, x), self.grad_shape(x)], like=x)

    def merge_seeds(self, g: str, y: str) -> str:
        """``[K, N, ...]`` -> ``[K*N, ...]`` for operators of fixed rank (Conv, pooling).

        The shape comes from ``g``, not ``y``: a new consumer of a Conv output would keep ONNX
        Runtime from fusing the Conv with what follows, and the original outputs would change.
        """
        return self.op("Reshape", [g, self.concat([self.ints([-1]), self.shape_slice(g, 2)], 0)], like=y)

    def unbroadcast(self, g: str, x: str, out_shape: Sequence[Dim]) -> str:
        """Sum a gradient of shape ``[K, *out_shape]`` down to ``[K, *shape(x)]``.

        The one place broadcasting is undone (as JAX's ``_unbroadcast``): leading axes ``x``
        lacks are summed away, as are axes where ``x`` has a static 1 and the output does not.
        """
        x_shape = self.info(x).shape
        if x_shape is None:
            raise InvalidModelError(f"ONNX shape inference could not find the rank of {x!r}")
        lead = len(out_shape) - len(x_shape)
        axes = list(range(1, lead + 1))
        for i, (dim_x, dim_out) in enumerate(zip(x_shape, out_shape[lead:])):
            if dim_x == 1 and dim_out != 1:
                axes.append(1 + lead + i)
        if not axes:
            return g
        summed = self.reduce("ReduceSum", g, axes, keepdims=True)
        return self.squeeze(summed, list(range(1, lead + 1))) if lead else summed

    def shape_of(self, name: str) -> tuple[Dim, ...]:
        shape = self.info(name).shape
        if shape is None:
            raise InvalidModelError(f"ONNX shape inference could not find the shape of {name!r}")
        return shape


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


def _path_values(graph: onnx.GraphProto, wrt: Sequence[str], of: str, builder: GraphBuilder) -> set[str]:
    """Float tensors that depend on some ``wrt`` tensor and that ``of`` depends on."""
    descendants = set(wrt)
    for node in graph.node:
        if any(i in descendants for i in node.input):
            descendants.update(o for o in node.output if o and _maybe_float(builder, o))
    return descendants & ancestors(graph, of)


def _maybe_float(builder: GraphBuilder, name: str) -> bool:
    """Floating tensors carry gradients; untyped ones are kept so their rule fails loudly."""
    info = builder.infos.get(name)
    return info is None or info.is_float


def append_gradients(builder: GradientBuilder, wrt: Sequence[str], of: str, seed: str,
                     rules: Mapping[str, Callable[..., Sequence[str | None]]]) -> dict[str, str]:
    """Append the graph of ``seed``'s vector-Jacobian products with respect to each ``wrt``.

    ``seed`` has shape ``[K, *shape(of)]``; the returned tensor for ``x`` in ``wrt`` has shape
    ``[K, *shape(x)]``: its k-th slice is the gradient of ``sum(seed[k] * of)`` w.r.t. ``x``.
    ``rules`` maps operator types to VJP rules (``explainrt.export.rules.RULES``, possibly with
    some replaced, e.g. FGVis's defended Relu); the driver itself knows no operator.
    """

    graph = builder.graph
    on_path = _path_values(graph, wrt, of, builder)
    unreached = [x for x in wrt if x not in on_path]
    if unreached:
        raise InvalidModelError(f"{of!r} does not depend on {unreached}: no gradient flows there")
    builder.seeds = builder.op("Slice", [builder.shape(seed), builder.ints([0]), builder.ints([1])],
                               name="explainrt/grad/seeds")
    contributions: dict[str, list[str]] = {of: [seed]}
    path_nodes = [n for n in graph.node if any(o in on_path for o in n.output)
                  and any(i in on_path for i in n.input)]
    for proto in reversed(path_nodes):
        node = Node.of(proto)
        incoming = [contributions.get(o) for o in node.outputs]
        if not any(incoming):
            continue
        if node.proto.domain not in ("", "ai.onnx"):
            raise node.unsupported(f"custom domain {node.proto.domain!r}")
        rule = rules.get(node.op_type)
        if rule is None:
            raise node.unsupported("add a VJP rule to explainrt.export.rules")
        builder.scope = f"explainrt/grad/{node.name}"
        output_grads = [_total(builder, o, terms) if terms else None for o, terms in zip(node.outputs, incoming)]
        input_grads = list(rule(builder, node, output_grads))
        input_grads += [None] * (len(node.inputs) - len(input_grads))
        for index, (x, gx) in enumerate(zip(node.inputs, input_grads)):
            if x not in on_path:
                continue
            if gx is None:
                raise node.unsupported(f"no gradient with respect to input {index} ({x!r})")
            contributions.setdefault(x, []).append(gx)
    builder.scope = "explainrt/grad"
    return {x: _total(builder, x, contributions[x]) for x in wrt}


def _total(builder: GradientBuilder, value: str, terms: list[str]) -> str:
    """Sum the fan-in of one tensor's gradient (once; later calls reuse it)."""
    if len(terms) == 1:
        return terms[0]
    total = builder.op("Sum", terms, name=f"explainrt/grad/{value}", like=value)
    terms[:] = [total]
    return total
