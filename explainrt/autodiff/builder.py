"""A small graph builder: appends nodes to an ONNX model under stable, readable names.

The exporter only ever *adds* nodes (the original ones stay untouched, so the original outputs
stay bit-identical); this class is the one place that knows how an ONNX node, initializer or
graph output is spelled, which opset-dependent form an operator takes, and what static type and
shape each tensor has (from ONNX shape inference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from explainrt.errors import InvalidModelError, UnknownSizeError

Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    """Static element type and (possibly partly symbolic) shape of a tensor."""

    elem_type: int
    shape: tuple[Dim, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES


FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
)


def _info_from_type(type_proto: onnx.TypeProto) -> TensorInfo | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tensor_type = type_proto.tensor_type
    shape: tuple[Dim, ...] | None = None
    if tensor_type.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
    return TensorInfo(tensor_type.elem_type, shape)


def tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Types and shapes of every tensor ONNX shape inference can type."""
    graph = model.graph
    infos: dict[str, TensorInfo] = {}
    for init in graph.initializer:
        infos[init.name] = TensorInfo(init.data_type, tuple(init.dims))
    for value in [*graph.input, *graph.value_info, *graph.output]:
        info = _info_from_type(value.type)
        if info is not None:
            infos[value.name] = info
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" else None
        if tensor is not None:
            infos[node.output[0]] = TensorInfo(tensor.data_type, tuple(tensor.dims))
    return infos


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
    return None


def shape_name(tensor: str) -> str:
    """The name of the Shape node (and its output) ``GraphBuilder.shape`` adds for ``tensor`` in a graph without one."""
    return f"explainrt/shape/{tensor}"


def opset_version(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InvalidModelError("the model imports no version of the default ONNX operator set")


def dequantized(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """(q - zero) * scale of a DequantizeLinear whose inputs are all initializers, per tensor or per axis;
    None for any other (computed inputs, blocked quantization, float8 types)."""
    names = [name for name in node.input if name]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if not all(name in constants for name in names) or attributes.get("block_size", 0):
        return None
    arrays = [onnx.numpy_helper.to_array(constants[name]) for name in names]
    quantized, scale = arrays[0], arrays[1]
    zero = arrays[2] if len(arrays) > 2 else np.zeros((), dtype=quantized.dtype)
    if quantized.dtype.kind not in "iu" or scale.dtype.kind != "f" or scale.ndim > 1:
        return None
    if scale.ndim == 1 and quantized.ndim > 1:
        shape = [1] * quantized.ndim
        shape[int(attributes.get("axis", 1))] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.ndim == 1 else zero
    return ((quantized.astype(np.float64) - zero.astype(np.float64)) * scale).astype(scale.dtype)


def node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensors ``node`` reads: its inputs and what its subgraphs (If, Loop, Scan) read from the enclosing
    scope."""
    found = {i for i in node.input if i}
    for attribute in node.attribute:
        for subgraph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
            local = {o for n in subgraph.node for o in n.output} | {i.name for i in subgraph.input} \
                | {t.name for t in subgraph.initializer}
            found |= {name for n in subgraph.node for name in node_reads(n)} - local
    return found


def sort_topologically(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` each after the producers of what it reads (``node_reads``), in their order where that allows;
    InvalidModelError on a cycle."""
    producer = {o: index for index, node in enumerate(nodes) for o in node.output if o}
    order: list[int] = []
    state: dict[int, bool] = {}  # False: being placed (its producers first), True: placed
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            index, ready = stack.pop()
            if ready:
                state[index] = True
                order.append(index)
                continue
            if index in state:
                if not state[index]:
                    raise InvalidModelError(f"the graph has a cycle through node {nodes[index].name!r}")
                continue
            state[index] = False
            stack.append((index, True))
            stack += [(producer[name], False) for name in sorted(node_reads(nodes[index]), reverse=True)
                      if name in producer and state.get(producer[name]) is not True]
    return [nodes[index] for index in order]


class GraphBuilder:
    """Appends nodes, constants and outputs to ``model.graph`` (mutated in place).

    Every new node is named ``<scope>/<OpType>`` (deduplicated with ``.1``, ``.2``... in build
    order, so names are the same on every export of the same model). ``scope`` is set by the
    caller, e.g. ``explainrt/grad/<tensor>`` while building that tensor's gradient.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = opset_version(model)
        self.infos = tensor_infos(model)
        self.scope = "explainrt"
        self._taken: set[str] = {n.name for n in self.graph.node}
        for value in self.infos:
            self._taken.add(value)
        for node in self.graph.node:
            self._taken.update(node.output)
        self._constants: dict[tuple[bytes, int, tuple[int, ...]], str] = {}
        self._shapes: dict[str, str] = {}
        self._constant_protos = {t.name: t for t in self.graph.initializer}
        self._producers: dict[str, onnx.NodeProto] | None = None  # built on first use, from the given nodes
        self._readers: dict[str, list[onnx.NodeProto]] | None = None
        for node in self.graph.node:
            tensor = _constant_tensor(node) if node.op_type == "Constant" else None
            if tensor is not None:
                self._constant_protos[node.output[0]] = tensor

    # -- naming -------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A name not used anywhere in the graph yet: ``hint`` itself, else ``hint.1``, ..."""
        name, count = hint, 0
        while name in self._taken:
            count += 1
            name = f"{hint}.{count}"
        self._taken.add(name)
        return name

    # -- nodes --------------------------------------------------------------------------------
    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        outputs: int = 1,
        name: str | None = None,
        like: str | None = None,
        **attrs: object,
    ) -> str:
        """Append one node; returns its (first) output name. ``like`` records its type."""
        return self.op_multi(op_type, inputs, outputs=outputs, name=name, like=like, **attrs)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        outputs: int,
        name: str | None = None,
        like: str | None = None,
        **attrs: object,
    ) -> list[str]:
        node_name = self.fresh(name or f"{self.scope}/{op_type}")
        out_names = [node_name] if outputs == 1 else [self.fresh(f"{node_name}:{i}") for i in range(outputs)]
        node = helper.make_node(op_type, list(inputs), out_names, name=node_name, **attrs)
        self.graph.node.append(node)
        if like is not None and like in self.infos:
            for out in out_names:
                self.infos[out] = self.infos[like]
        return out_names

    def constant(self, value: np.ndarray | float | Sequence[int], *, dtype: int) -> str:
        """An initializer holding ``value`` as ONNX element type ``dtype`` (shared when equal)."""
        array = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
        key = (array.tobytes(), dtype, array.shape)
        if key not in self._constants:
            name = self.fresh(f"explainrt/const/{array.dtype}{list(array.shape)}")
            tensor = numpy_helper.from_array(array, name)
            self.graph.initializer.append(tensor)
            self._constant_protos[name] = tensor
            self.infos[name] = TensorInfo(dtype, array.shape)
            self._constants[key] = name
        return self._constants[key]

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (axes, shapes, starts...)."""
        return self.constant(np.asarray(values, dtype=np.int64), dtype=TensorProto.INT64)

    def scalar_like(self, value: float, like: str) -> str:
        """A scalar constant of ``like``'s floating type."""
        return self.constant(value, dtype=self.info(like).elem_type)

    def add_output(self, name: str, source: str, elem_type: int, shape: Sequence[Dim]) -> None:
        """Expose ``source`` as a new graph output called ``name`` (through an Identity)."""
        self._taken.add(name)
        self.graph.node.append(helper.make_node("Identity", [source], [name], name=self.fresh(f"{self.scope}/{name}")))
        self.graph.output.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def add_input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        if name in self._taken:
            raise InvalidModelError(f"the model already has a tensor named {name!r}")
        self._taken.add(name)
        self.graph.input.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        self.infos[name] = TensorInfo(elem_type, tuple(shape))
        return name

    # -- static facts ---------------------------------------------------------------------------
    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output; None for computed tensors."""
        proto = self._constant_protos.get(name)
        return None if proto is None else numpy_helper.to_array(proto)

    def _index_given_nodes(self) -> None:
        if self._producers is None:
            self._producers, self._readers = {}, {}
            for node in self.graph.node:
                self._producers.update(dict.fromkeys(node.output, node))
                for name in node.input:
                    self._readers.setdefault(name, []).append(node)

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node of the model as first asked (before gradients were added) that outputs ``name``; None for
        inputs, initializers and added tensors."""
        self._index_given_nodes()
        return self._producers.get(name)  # type: ignore[union-attr]

    def readers(self, name: str) -> list[onnx.NodeProto]:
        """The nodes of the model as first asked (see ``producer``) that read ``name``."""
        self._index_given_nodes()
        return self._readers.get(name, [])  # type: ignore[union-attr]

    def weight_value(self, name: str) -> np.ndarray | None:
        """The value of a constant, or of a DequantizeLinear of constants (an int8 QDQ model's weight) computed
        here; None for other computed tensors."""
        value = self.constant_value(name)
        if value is not None:
            return value
        producer = self.producer(name)
        if producer is None or producer.op_type != "DequantizeLinear":
            return None
        return dequantized(producer, self._constant_protos)

    def info(self, name: str) -> TensorInfo:
        info = self.infos.get(name)
        if info is None:
            raise InvalidModelError(f"ONNX shape inference could not type tensor {name!r}")
        return info

    def rank(self, name: str) -> int:
        rank = self.info(name).rank
        if rank is None:
            raise InvalidModelError(f"ONNX shape inference could not find the rank of {name!r}")
        return rank

    def static_shape(self, name: str, what: str) -> tuple[Dim, ...]:
        """The shape of ``name``; every dimension but the batch (axis 0) must be a known integer."""
        shape = self.info(name).shape
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            raise UnknownSizeError(f"{what} needs the static shape of {name!r}, got {shape}")
        return shape

    # -- opset-aware building blocks -----------------------------------------------------------
    def shape(self, name: str) -> str:
        """``Shape(name)``, built once per tensor."""
        if name not in self._shapes:
            self._shapes[name] = self.op("Shape", [name], name=shape_name(name))
        return self._shapes[name]

    def shape_slice(self, name: str, start: int, end: int | None = None) -> str:
        stop = np.iinfo(np.int64).max if end is None else end
        return self.op("Slice", [self.shape(name), self.ints([start]), self.ints([stop])])

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        """ReduceSum/ReduceMean/ReduceMax over ``axes``, in the form the model's opset wants."""
        if not axes:  # ONNX reads no axes as "all axes"; a reduction over none is the identity
            return x
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, [x, self.ints(axes)], keepdims=int(keepdims), like=x)
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims), like=x)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.ints(axes)], like=x)

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", [x, self.ints(axes)], like=x)

    def concat(self, parts: Sequence[str], axis: int) -> str:
        return parts[0] if len(parts) == 1 else self.op("Concat", list(parts), axis=axis)
