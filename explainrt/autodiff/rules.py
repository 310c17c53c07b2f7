"""One vector-Jacobian-product rule per ONNX operator, built from plain inference operators.

A rule takes the forward node and the gradients of the node's outputs (``None`` where no gradient
flows) and returns one gradient per input (``None``, or nothing at the end, for inputs that take
none, such as shapes and indices). Tensors are value handles (``V``, see ``gradients.py``): their
Python operators append ONNX nodes, so a rule reads like its math. A gradient of forward tensor
``x`` has shape ``[K, *shape(x)]`` (the seed axis); axes are therefore always negative numbers,
which mean the same thing with and without the seed axis.

Element-wise rules are one line in the table at the bottom, over ``(n, g, *inputs, *outputs)``;
longer ones are named functions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from onnx import TensorProto, helper

from explainrt.autodiff.builder import Dim, TensorInfo
from explainrt.autodiff.gradients import GradientBuilder, Node, Rule, V, add_n, blocks_path, through_integers, where
from explainrt.errors import InvalidModelError, UnknownSizeError

Grads = Sequence[V | None]


def elementwise(f: Callable[..., V | Grads]) -> Rule:
    """A rule from ``f(n, g, *inputs, *outputs)``, ``g`` being the gradient of the one output."""

    def rule(n: Node, g: Grads) -> Grads:
        grads = f(n, g[0], *n.x, *n.y)
        return (grads,) if isinstance(grads, V) else grads

    return rule


def neg_axis(axis: int, rank: int) -> int:
    """An axis as a negative number, valid with and without the leading seed axis."""
    return axis - rank if axis >= 0 else axis


def input_or_attr(n: Node, index: int, attr: str) -> list[int] | None:
    """Operator arguments that moved from attributes to constant inputs across opsets."""
    if len(n.inputs) > index and n.inputs[index]:
        value = n.b.constant_value(n.inputs[index])
        if value is None:
            raise n.unsupported(f"input {index} ({attr}) must be a constant for the gradient")
        return [int(v) for v in value.reshape(-1)]
    value = n.attr(attr)
    return None if value is None else [int(v) for v in value]  # type: ignore[union-attr]


def _grad_of(x: V, name: str) -> V:
    """Tensor ``name``, built without handles, as a gradient of forward value ``x``."""
    return V(x.b, name, x.info, seeded=True)


def _zeros(x: V) -> V:
    """A zero gradient for forward value ``x``."""
    return _grad_of(x, x.b.zeros_grad(x.name))


# -- element-wise --------------------------------------------------------------------------------
def _div(n: Node, g: V, a: V, b: V, y: V) -> Grads:
    """d(a/b) = g/b and -g a/b^2 = -(g/b) y."""
    ga = g / b
    return ga.unbroadcast(a), (-ga * y).unbroadcast(b)


def _sigmoid_of(n: Node, s: V, x: V) -> bool:
    """Whether ``s`` is Sigmoid(``x``) (SiLU is ``x * Sigmoid(x)``)."""
    producer = n.b.producer(s.name)
    return producer is not None and producer.op_type == "Sigmoid" and producer.input[0] == x.name


def _sigmoid_again(x: V) -> V:
    """Sigmoid(x) computed again for a SiLU's gradient rather than read: ONNX Runtime fuses a SiLU's Sigmoid and
    Mul into one kernel (QuickGelu) only when nothing else reads the sigmoid. Taken of x with a leading size-1
    axis (a seed axis of 1, which broadcasts), else ONNX Runtime's common-subexpression elimination would merge
    it with the forward Sigmoid(x) again."""
    b = x.b
    return V(b, b.op("Sigmoid", [b.unsqueeze(x.name, [0])]), x.info, seeded=True)


def _mul(n: Node, g: V, a: V, b: V, y: V) -> Grads:
    """d(a b) = g b and g a; in a SiLU, x * Sigmoid(x), with the sigmoid computed again (``_sigmoid_again``)."""
    a_factor = _sigmoid_again(b) if _sigmoid_of(n, a, b) else a
    b_factor = _sigmoid_again(a) if _sigmoid_of(n, b, a) else b
    return (g * b_factor).unbroadcast(a), (g * a_factor).unbroadcast(b)


def _sigmoid(n: Node, g: V, x: V, y: V) -> V:
    """g y (1 - y); in a SiLU with y computed again from x (``_sigmoid_again``), so that the forward SiLU stays fused."""
    silu = any(node.op_type == "Mul" and set(node.input) == {x.name, y.name} for node in n.b.readers(y.name))
    s = _sigmoid_again(x) if silu else y
    return g * (s * (1 - s))


def _mean(n: Node, g: Grads) -> Grads:
    share = g[0] / len(n.x)
    return [share.unbroadcast(x) for x in n.x]


def _extremum(n: Node, g: Grads) -> Grads:
    """Max/Min: an equal share to each input equal to the result (torch.maximum halves a tie)."""
    y = n.y[0]
    hits = [x == y for x in n.x]
    share = g[0] / add_n([hit.cast(y.dtype) for hit in hits])
    return [where(hit, share, 0).unbroadcast(x) for x, hit in zip(n.x, hits)]


def _clip(n: Node, g: Grads) -> Grads:
    """Pass the gradient strictly inside [min, max].

    The mask reads the output (min < y < max holds exactly where min < x < max) so that ONNX
    Runtime can still fuse the Conv producing x with this Clip (ReLU6).
    """
    y, low, high = n.y[0], n.input(1), n.input(2)
    inside = None if low is None else y > low
    if high is not None:
        inside = y < high if inside is None else inside & (y < high)
    return (g[0] if inside is None else where(inside, g[0], 0),)


def _hard_sigmoid(n: Node, g: V, x: V, y: V) -> V:
    alpha = float(n.attr("alpha", 0.2))  # type: ignore[arg-type]
    z = alpha * x + float(n.attr("beta", 0.5))  # type: ignore[arg-type]
    return where((z > 0) & (z < 1), g * alpha, 0)


def _gelu(n: Node, g: V, x: V, y: V) -> V:
    if n.attr("approximate", "none") == "tanh":  # y = x/2 (1 + t), t = tanh(c (x + k x^3))
        c, k = math.sqrt(2 / math.pi), 0.044715
        t = (c * (x + k * x * x * x)).tanh()
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * (c * (1 + 3 * k * x * x)))
    cdf = 0.5 * (1 + (x / math.sqrt(2)).erf())  # exact: Phi(x) + x phi(x)
    pdf = (-0.5 * x * x).exp() / math.sqrt(2 * math.pi)
    return g * (cdf + x * pdf)


# -- reshaping, reordering, selection ----------------------------------------------------------
def _reshaped(n: Node, g: Grads) -> Grads:
    return (g[0].reshape_like(n.x[0]),)


def _transpose(n: Node, g: Grads) -> Grads:
    rank = n.x[0].rank
    perm = list(n.attr("perm") or reversed(range(rank)))  # type: ignore[arg-type]
    return (g[0].transpose([perm.index(axis) for axis in range(rank)]),)


def _concat(n: Node, g: Grads) -> Grads:
    b, xs = n.b, n.x
    axis = int(n.attr("axis"))  # type: ignore[arg-type]
    rank = xs[0].rank
    pos = axis % rank
    # static sizes where the graph knows them (not along the batch): the parts' shapes are then known to the passes
    # that rewrite the reverse pass (``windows``)
    infos = [b.infos.get(x) for x in n.inputs]
    static = [info.shape[pos] if pos > 0 and info is not None and info.rank == rank else None  # type: ignore[index]
              for info in infos]
    sizes = b.ints(static) if all(isinstance(size, int) and size > 0 for size in static) \
        else b.concat([b.shape_slice(x, pos, pos + 1) for x in n.inputs], 0)  # type: ignore[arg-type]
    product = b.products.get(g[0].name)
    if product is not None and neg_axis(axis, rank) in product.axes:  # the varying factor split, each part multiplied
        parts = b.op_multi("Split", [product.varying, sizes], outputs=len(xs), axis=neg_axis(axis, rank))
        return [_grad_of(x, b.op("Mul", [product.constant, part])) for x, part in zip(xs, parts)]
    parts = b.op_multi("Split", [g[0].name, sizes], outputs=len(xs), axis=neg_axis(axis, rank))
    return [_grad_of(x, part) for x, part in zip(xs, parts)]


def _split(n: Node, g: Grads) -> Grads:
    x = n.x[0]
    parts = [gy.name if gy is not None else n.b.zeros_grad(y) for y, gy in zip(n.outputs, g)]
    return (_grad_of(x, n.b.concat(parts, neg_axis(int(n.attr("axis", 0)), x.rank))),)  # type: ignore[arg-type]


def _slice(n: Node, g: Grads) -> Grads:
    """Pad the gradient back with zeros; along an axis sliced with a step other than 1 (Swin's patch merging
    ``x[..., 0::2, 0::2, :]``, a flip), first reversed where the step is negative and spread with step - 1 zeros
    after each element (``_spread``). Only the sliced axes need a static size (a unit-step slice from a start to
    the end of an axis needs none)."""
    b, x = n.b, n.x[0]
    shape = b.info(n.inputs[0]).shape
    if shape is None:
        raise n.unsupported(f"the rank of {n.inputs[0]!r} is unknown")
    rank = len(shape)
    out_shape = b.info(n.outputs[0]).shape
    starts, ends = input_or_attr(n, 1, "starts"), input_or_attr(n, 2, "ends")
    axes = input_or_attr(n, 3, "axes") or list(range(len(starts or [])))
    steps = input_or_attr(n, 4, "steps") or [1] * len(axes)
    grad = g[0].name
    before, after = [0] * (rank + 1), [0] * (rank + 1)
    for axis, start, end, step in zip(axes, starts or [], ends or [], steps):
        axis %= rank
        if not isinstance(shape[axis], int):
            if step != 1 or start < 0 or end < 2**31 - 1:
                raise UnknownSizeError(f"Slice {n.name!r} along axis {axis} of {n.inputs[0]!r} other than from a "
                                       f"start to its end with step 1 needs the axis' static size, got {shape}")
            before[axis + 1] = start
            continue
        if step < 0 and end in (2**31 - 1, 2**63 - 1):
            raise InvalidModelError(f"Slice {n.name!r} ends at INT_MAX with step {step} along axis {axis}: ONNX Runtime "
                                    "slices to the first element, the ONNX standard and its shape inference to "
                                    "nothing; write the end as INT64_MIN")
        picked = range(*slice(start, end, step).indices(shape[axis]))
        if out_shape is not None and isinstance(out_shape[axis], int) and out_shape[axis] != len(picked):
            raise InvalidModelError(f"Slice {n.name!r} picks {len(picked)} elements along axis {axis} of "
                                    f"{n.inputs[0]!r}, but its output declares {out_shape[axis]}")
        if not picked:  # the output is empty: nothing flows back
            return (_zeros(x),)
        first, stride = (picked[0], step) if step > 0 else (picked[-1], -step)
        if step < 0:
            grad = b.op("Slice", [grad, b.ints([-1]), b.ints([np.iinfo(np.int64).min]), b.ints([axis + 1]),
                                  b.ints([-1])])
        length = len(picked)
        if stride > 1:
            grad, length = _spread(b, grad, axis + 1, stride, rank + 1), length * stride
        kept = min(length, shape[axis] - first)  # the zeros after the last element that fall past the input
        if kept < length:
            grad = b.op("Slice", [grad, b.ints([0]), b.ints([kept]), b.ints([axis + 1])])
        before[axis + 1], after[axis + 1] = first, shape[axis] - first - kept
    return (V(b, grad, seeded=g[0].seeded).op("Pad", b.ints(before + after), info=x.info),)


def _spread(b: GradientBuilder, x: str, axis: int, stride: int, rank: int) -> str:
    """``x`` with ``stride - 1`` zeros after each element along ``axis`` (of ``rank`` axes): an axis of
    length m becomes m * stride."""
    pads = [0] * 2 * (rank + 1)
    pads[rank + 1 + axis + 1] = stride - 1
    spread = b.op("Pad", [b.unsqueeze(x, [axis + 1]), b.ints(pads)])
    merged = b.concat([b.shape_slice(spread, 0, axis), b.ints([-1]), b.shape_slice(spread, axis + 2)], 0)
    return b.op("Reshape", [spread, merged])


Places = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(constant indices, the data's shape as floats, NaN for an unknown size) -> the places they read, one row each
(NaN where they depend on an unknown size)."""


def _gather(n: Node, g: Grads) -> Grads:
    """Scatter-add the gathered gradient back into a zero tensor shaped like the data; a constant index
    or run of consecutive indices (a transformer's q, k, v = qkv[0], qkv[1], qkv[2]; its CLS token) pads
    the gradient with zeros instead, which costs a copy where ScatterElements costs many."""
    b, (data, _) = n.b, n.inputs
    x = n.x[0]
    axis = int(n.attr("axis", 0)) % x.rank  # type: ignore[arg-type]
    padded = _gather_as_pad(n, g[0], axis)
    if padded is not None:
        return (padded, None)
    rows = b.op("Reshape", [_wrapped_indices(n, b.op("Gather", [b.shape(data), b.ints([axis])])), b.ints([-1])])
    g_rows = b.op("Reshape", [g[0].name, b.concat([b.seeds, b.shape_slice(data, 0, axis), b.ints([-1]),
                                                   b.shape_slice(data, axis + 1)], 0)])
    return (_grad_of(x, _scatter_rows(n, _zeros(x).name, rows, g_rows, axis, x.rank,
                                      lambda known, size: (known % size[axis]).reshape(-1, 1))), None)


def _gather_nd(n: Node, g: Grads) -> Grads:
    """GatherND (batch_dims 0; torch exports adaptive pooling to a size its input does not divide with it): a
    Gather of rows of the data with its first r axes merged into one (indices [..., r] reach the first r axes),
    each index tuple a row number. ScatterElements, which TensorRT runs with reduction 'add' (ScatterND it
    does not), adds the rows back, an index tuple taken twice (the pooling's) getting both gradients."""
    b, (data, indices) = n.b, n.inputs
    x = n.x[0]
    if int(n.attr("batch_dims", 0)):  # type: ignore[arg-type]
        raise n.unsupported("batch_dims > 0 (a gradient rule exists for batch_dims 0 only)")
    index_shape = b.info(indices).shape
    depth = index_shape[-1] if index_shape else None
    if not isinstance(depth, int) or not all(isinstance(d, int) for d in x.shape[1:depth]):
        raise n.unsupported("indices whose last dimension, or data whose indexed axes after the first, are not static")
    strides = np.cumprod([1, *x.shape[1:depth][::-1]])[::-1]  # type: ignore[arg-type]
    wrapped = _wrapped_indices(n, b.shape_slice(data, 0, depth))
    rows = b.op("Reshape", [b.reduce("ReduceSum", b.op("Mul", [wrapped, b.ints(strides)]), [-1], keepdims=False),
                            b.ints([-1])])
    rest = b.shape_slice(data, depth)
    merged = b.op("Expand", [b.scalar_like(0.0, data),
                             b.concat([b.seeds, b.reduce("ReduceProd", b.shape_slice(data, 0, depth), [0]), rest], 0)])
    g_rows = b.op("Reshape", [g[0].name, b.concat([b.seeds, b.ints([-1]), rest], 0)])
    scattered = _scatter_rows(n, merged, rows, g_rows, 0, x.rank - depth + 1,
                              lambda known, size: (known.reshape(-1, depth) % size[:depth]) @ strides[:, None])
    return (_grad_of(x, b.op("Reshape", [scattered, b.grad_shape(data)])), None)


def _scatter_rows(n: Node, zeros: str, rows: str, g_rows: str, axis: int, rank: int, read: Places) -> str:
    """``zeros`` ([K, ...], per seed of ``rank`` axes) plus ``g_rows`` scattered along per-seed ``axis`` at ``rows``
    (1-D int64, non-negative: where each of g_rows' rows was read); ``read`` as ``_scatter_reduction``'s."""
    b = n.b
    placed = b.op("Reshape", [rows, b.ints([1] * (axis + 1) + [-1] + [1] * (rank - axis - 1))])
    expanded = b.op("Expand", [placed, b.shape(g_rows)])
    return b.op("ScatterElements", [zeros, expanded, g_rows], axis=axis + 1, **_scatter_reduction(n, read))


def _gather_elements(n: Node, g: Grads) -> Grads:
    """GatherElements (torch.gather): ScatterElements adds each gradient back where its element came from,
    the indices repeated along the seed axis."""
    b, (data, indices) = n.b, n.inputs
    x = n.x[0]
    axis = int(n.attr("axis", 0)) % x.rank  # type: ignore[arg-type]

    def read(known: np.ndarray, size: np.ndarray) -> np.ndarray:  # each element's coordinates in the data
        coordinates = np.indices(known.shape, dtype=np.float64)
        coordinates[axis] = known % size[axis]
        return coordinates.reshape(len(size), -1).T

    wrapped = _wrapped_indices(n, b.op("Gather", [b.shape(data), b.ints([axis])]))
    expanded = b.op("Expand", [b.unsqueeze(wrapped, [0]), b.grad_shape(indices)])
    return (_zeros(x).op("ScatterElements", expanded, g[0], axis=axis + 1, **_scatter_reduction(n, read)), None)


def _wrapped_indices(n: Node, bounds: str) -> str:
    """The node's indices (input 1) as int64, negative ones counted from the end of ``bounds`` (a shape that
    broadcasts against them): the places the gather read, as a scatter wants them."""
    b, indices = n.b, n.inputs[1]
    if b.info(indices).elem_type != TensorProto.INT64:
        indices = b.op("Cast", [indices], to=TensorProto.INT64)
    return b.op("Where", [b.op("Less", [indices, b.ints([0])]), b.op("Add", [indices, bounds]), indices])


def _scatter_reduction(n: Node, read: Places) -> dict[str, str]:
    """``reduction='add'`` (opset 16 on), so that a place gathered twice gets both gradients; before opset 16,
    only constant indices whose places ``read`` never repeat scatter right without it (the sizes the places
    need must be static)."""
    if n.b.opset >= 16:
        return {"reduction": "add"}
    known = n.b.constant_value(n.inputs[1])
    size = np.array([d if isinstance(d, int) else np.nan for d in n.x[0].shape])
    places = None if known is None else read(known, size)
    if places is None or np.isnan(places).any() or len(np.unique(places, axis=0)) != len(places):
        raise n.unsupported(f"indices that may repeat need ScatterElements(reduction='add'), opset 16 "
                            f"(model: {n.b.opset})")
    return {}


def _gather_as_pad(n: Node, g: V, axis: int) -> V | None:
    """The gradient of a Gather whose indices are one constant or consecutive constants: g (the taken
    axis restored where the index was a scalar) padded with zeros along ``axis``; None otherwise."""
    known = n.b.constant_value(n.inputs[1])
    x = n.x[0]
    size = x.shape[axis]
    if known is None or known.ndim > 1 or known.size == 0 or not isinstance(size, int):
        return None
    first = int(known.reshape(-1)[0]) % size
    if known.ndim == 1 and not np.array_equal(known % size, np.arange(first, first + known.size)):
        return None
    if known.ndim == 0:
        g = g.unsqueeze([axis - x.rank])
    before, after = [0] * (x.rank + 1), [0] * (x.rank + 1)
    before[axis + 1], after[axis + 1] = first, size - first - int(known.size)
    return g.op("Pad", n.b.ints(before + after), info=x.info)


def _pad(n: Node, g: Grads) -> Grads:
    """Constant-mode Pad: crop the gradient back (negative pads are the inverse crop)."""
    if n.attr("mode", "constant") != "constant":
        raise n.unsupported(f"Pad mode {n.attr('mode')!r}")
    x = n.x[0]
    pads = input_or_attr(n, 1, "pads")
    rank = x.rank
    axes = input_or_attr(n, 3, "axes") if len(n.inputs) > 3 else None
    axes = [a % rank for a in axes] if axes else list(range(rank))
    full = [0] * (2 * (rank + 1))
    for j, axis in enumerate(axes):
        full[axis + 1] = -pads[j]  # type: ignore[index]
        full[rank + 1 + axis + 1] = -pads[len(axes) + j]  # type: ignore[index]
    return (g[0].op("Pad", n.b.ints(full), info=x.info),)


# -- reductions --------------------------------------------------------------------------------
def _reduced_axes(n: Node) -> list[int]:
    rank = n.x[0].rank
    if n.op_type.startswith("Global"):
        return list(range(2 - rank, 0))
    axes = input_or_attr(n, 1, "axes")
    if not axes:
        return [] if n.attr("noop_with_empty_axes", 0) else list(range(-rank, 0))
    return sorted(neg_axis(a, rank) for a in axes)


def _keep_dims(n: Node, t: V) -> V:
    """A reduction's result (or its gradient) with the reduced axes kept as size 1."""
    keeps = n.op_type.startswith("Global") or n.attr("keepdims", 1)
    return t if keeps else t.unsqueeze(_reduced_axes(n))


def _numel(x: V) -> V:
    """The number of elements of ``x``, as a scalar of its type."""
    return x.op("Size", info=TensorInfo(TensorProto.INT64, ())).cast(x.dtype)


def _reduce_mean(n: Node, g: Grads) -> Grads:
    """ReduceMean and GlobalAveragePool: spread evenly; size(y)/size(x) is 1/count."""
    x, y = n.x[0], n.y[0]
    return ((_keep_dims(n, g[0]) * _size_ratio(n, x, y)).expand_like(x),)


def _size_ratio(n: Node, x: V, y: V) -> V | np.ndarray:
    """size(y) / size(x) of a reduction: a constant where the sizes of x and y are static but for a
    batch axis that is not reduced (the value float32 division of the run-time sizes gives), else computed
    at run time."""
    x_shape, y_shape = x.info.shape, y.info.shape
    static = x.dtype == TensorProto.FLOAT and x_shape is not None and y_shape is not None and all(
        isinstance(d, int) and d > 0 for d in (*x_shape[1:], *y_shape[1:])) and -len(x_shape) not in _reduced_axes(n)
    if not static:
        return _numel(y) / _numel(x)
    return np.float32(math.prod(y_shape[1:])) / np.float32(math.prod(x_shape[1:]))  # type: ignore[index]


def _reduce_sum(n: Node, g: Grads) -> Grads:
    return (_keep_dims(n, g[0]).expand_like(n.x[0]),)


def _reduce_l2(n: Node, g: Grads) -> Grads:
    """y = sqrt(sum x^2): dx = g x / y (F.normalize's norm; where y = 0 torch's gradient is 0, and so is this)."""
    x = n.x[0]
    y = _keep_dims(n, n.y[0])
    return (where(y > 0, _keep_dims(n, g[0]) * x / y, 0),)


def _reduce_l1(n: Node, g: Grads) -> Grads:
    """y = sum |x|: dx = g sign(x) (F.normalize(p=1)'s norm; 0 at x = 0, as torch)."""
    return (_keep_dims(n, g[0]) * n.x[0].sign(),)


def _extreme_reduce(n: Node, g: Grads) -> Grads:
    """ReduceMax/ReduceMin/GlobalMaxPool: shared equally among the inputs equal to the result (torch.amax)."""
    x = n.x[0]
    hits = x == _keep_dims(n, n.y[0])
    share = _keep_dims(n, g[0]) / hits.cast(x.dtype).sum(_reduced_axes(n))
    return (where(hits, share, 0),)


def _softmax(n: Node, g: Grads) -> Grads:
    y = n.y[0]
    axis = neg_axis(int(n.attr("axis", -1)), y.rank)  # type: ignore[arg-type]
    gy = g[0] * y
    return (gy - y * gy.sum([axis]),)


def _log_softmax(n: Node, g: Grads) -> Grads:
    y = n.y[0]
    axis = neg_axis(int(n.attr("axis", -1)), y.rank)  # type: ignore[arg-type]
    return (g[0] - y.exp() * g[0].sum([axis]),)


# -- linear algebra ----------------------------------------------------------------------------
def _matmul(n: Node, g: Grads) -> Grads:
    a, b = n.x
    if a.rank < 2 or b.rank < 2:
        raise n.unsupported("MatMul with a 1-D operand")
    return (g[0] @ b.mT).unbroadcast(a), (a.mT @ g[0]).unbroadcast(b)


def _gemm(n: Node, g: Grads) -> Grads:
    """Y = alpha * A' B' + beta * C with A' = A or A^T, B' = B or B^T (2-D operands)."""
    a, b, c = n.x[0], n.x[1], n.input(2)
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))  # type: ignore[arg-type]
    trans_a, trans_b = int(n.attr("transA", 0)), int(n.attr("transB", 0))  # type: ignore[arg-type]
    a_prime_t = a if trans_a else a.mT
    b_prime_t = b if trans_b else b.mT
    ga = g[0] @ b_prime_t * alpha  # gradient of A'
    gb = a_prime_t @ g[0] * alpha  # gradient of B'
    grads = [ga.mT if trans_a else ga, gb.mT if trans_b else gb]
    if c is not None:
        grads.append((g[0] * beta).unbroadcast(c))
    return grads


def _einsum_terms(n: Node) -> tuple[list[str], str]:
    """The operands' subscripts and the output's (the implicit output spelt out), each "..." as one "."."""
    equation = str(n.attr("equation")).replace(" ", "").replace("...", ".")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if not arrow:  # implicit: the ellipsis, then the letters that occur once, in alphabetical order
        letters = [c for c in inputs if c.isalpha()]
        output = ("." if "." in inputs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return terms, output


def _einsum(n: Node, g: Grads) -> Grads:
    """The gradient of each operand is the einsum of the output's gradient with the other operands,
    to that operand's subscripts (a matrix product's rule, for any contraction); broadcast ellipsis
    axes are summed back. A subscript repeated within one operand (a diagonal) or summed within a
    single operand has no such form: refused."""
    terms, output = _einsum_terms(n)
    letters = set("".join(terms) + output)
    seed = next(c for c in "kzyxwvutsrqponmlKZYXWVUTSRQPONML" if c not in letters)
    grads: list[V | None] = []
    for index, (term, x) in enumerate(zip(terms, n.x)):
        others = [t for j, t in enumerate(terms) if j != index]
        alone = [c for c in term if c.isalpha() and c not in output and not any(c in t for t in others)]
        if len(set(term)) != len(term) or alone:
            raise n.unsupported(f"equation {n.attr('equation')!r}: operand {index} repeats a subscript or sums one "
                                "alone")
        equation = ",".join([seed + output, *others]) + "->" + seed + term
        rest = [v for j, v in enumerate(n.x) if j != index]
        shape = _einsum_shape(term, [output, *others], [n.y[0].shape, *(v.shape for v in rest)])  # type: ignore[union-attr]
        grad = g[0].op("Einsum", *rest, info=TensorInfo(x.dtype, shape), equation=equation.replace(".", "..."))  # type: ignore[arg-type]
        grads.append(grad.unbroadcast(x))
    return grads


def _einsum_shape(term: str, terms: Sequence[str], shapes: Sequence[Sequence[object]]) -> tuple[object, ...]:
    """The shape of subscripts ``term`` from operands ``terms`` of ``shapes``: each letter's size, the
    ellipsis as the broadcast of the operands' ellipsis axes."""
    sizes: dict[str, object] = {}
    ellipses: list[list[object]] = []
    for t, shape in zip(terms, shapes):
        dot = t.find(".")
        if dot < 0:
            sizes.update(zip(t, shape))
            continue
        width = len(shape) - (len(t) - 1)
        sizes.update(zip(t[:dot], shape[:dot]))
        sizes.update(zip(t[dot + 1:], shape[dot + width:]))
        ellipses.append(list(shape[dot:dot + width]))
    rank = max((len(e) for e in ellipses), default=0)
    broadcast = []
    for axis in range(rank):
        dims = [e[axis - rank + len(e)] for e in ellipses if axis - rank + len(e) >= 0]
        known = [d for d in dims if d != 1]
        broadcast.append(next((d for d in known if isinstance(d, int)), known[0] if known else 1))
    return tuple(d for c in term for d in (broadcast if c == "." else [sizes[c]]))


# -- normalisation -----------------------------------------------------------------------------
def _batch_norm(n: Node, g: Grads) -> Grads:
    """Inference-mode BatchNormalization is a per-channel affine map: g * scale / sqrt(var + eps)."""
    if int(n.attr("training_mode", 0)):  # type: ignore[arg-type]
        raise n.unsupported("training_mode=1")
    x, scale, var = n.x[0], n.x[1], n.x[4]
    factor = scale / (var + float(n.attr("epsilon", 1e-5))).sqrt()  # type: ignore[arg-type]
    return (g[0] * factor.unsqueeze(list(range(2 - x.rank, 0))),)


def _standardised(x: V, gh: V, axes: Sequence[int], epsilon: float) -> V:
    """The gradient through x_hat = (x - mean) / sqrt(var + eps) over ``axes``, given gh = dL/dx_hat:
    inv_std * (gh - mean(gh) - x_hat * mean(gh * x_hat))."""
    centred = x - x.mean(axes)
    inv_std = ((centred * centred).mean(axes) + epsilon).sqrt().reciprocal()
    x_hat = centred * inv_std
    return (gh - gh.mean(axes) - x_hat * (gh * x_hat).mean(axes)) * inv_std


def _layer_norm(n: Node, g: Grads) -> Grads:
    """Standardised over the axes from ``axis`` on, then scaled: gh = g * scale."""
    x, scale = n.x[0], n.x[1]
    rank = x.rank
    axes = list(range(int(n.attr("axis", -1)) % rank - rank, 0))  # type: ignore[arg-type]
    return (_standardised(x, g[0] * scale, axes, float(n.attr("epsilon", 1e-5))),)  # type: ignore[arg-type]


def _instance_norm(n: Node, g: Grads) -> Grads:
    """Standardised per image and channel over the spatial axes, then scaled per channel."""
    x, scale = n.x[0], n.x[1]
    spatial = list(range(2 - x.rank, 0))
    gh = g[0] * scale.unsqueeze(spatial)
    return (_standardised(x, gh, spatial, float(n.attr("epsilon", 1e-5))), None, None)  # type: ignore[arg-type]


def _group_norm(n: Node, g: Grads) -> Grads:
    """GroupNormalization (opset 21; opset 18's per-group scale is deprecated): standardised per image
    over each group of channels with their spatial axes, then scaled per channel."""
    b, x, scale = n.b, n.x[0], n.x[1]
    groups = int(n.attr("num_groups"))  # type: ignore[arg-type]
    per_group = TensorInfo(x.dtype, (x.shape[0], groups, None))
    grouped_x = x.op("Reshape", b.ints([0, groups, -1]), info=per_group)
    gh = g[0] * scale.unsqueeze(list(range(2 - x.rank, 0)))
    grouped_g = gh.op("Reshape", b.ints([0, 0, groups, -1]), info=per_group)
    return (_standardised(grouped_x, grouped_g, [-1], float(n.attr("epsilon", 1e-5))).reshape_like(x),  # type: ignore[arg-type]
            None, None)


def _lp_normalization(n: Node, g: Grads) -> Grads:
    """y = x / ||x||_p along ``axis`` (p = 1 or 2): dx = (g - d||x|| * sum(g y)) / ||x||, with
    d||x|| = y for p = 2 and sign(x) for p = 1; 0 where the norm is 0."""
    x, y = n.x[0], n.y[0]
    axis = neg_axis(int(n.attr("axis", -1)), x.rank)  # type: ignore[arg-type]
    p = int(n.attr("p", 2))  # type: ignore[arg-type]
    if p not in (1, 2):
        raise n.unsupported(f"p={p}")
    slope = y if p == 2 else x.sign()
    norm = (x * slope).sum([axis]) if p == 1 else (x * x).sum([axis]).sqrt()
    return (where(norm > 0, (g[0] - slope * (g[0] * y).sum([axis])) / norm, 0),)


# -- resampling and rearranging ----------------------------------------------------------------
_COORDINATES: dict[str, Callable[[np.ndarray, int, int, float], np.ndarray]] = {
    # Resize's coordinate_transformation_mode: output positions -> input coordinates, given the
    # input and output lengths and the axis's scale (ONNX Resize; tf_crop_and_resize is not here)
    "half_pixel": lambda x, i, o, s: (x + 0.5) / s - 0.5,
    "pytorch_half_pixel": lambda x, i, o, s: (x + 0.5) / s - 0.5 if o > 1 else np.full_like(x, -0.5),
    "align_corners": lambda x, i, o, s: x * (i - 1) / (o - 1) if o > 1 else np.zeros_like(x),
    "asymmetric": lambda x, i, o, s: x / s,
    "half_pixel_symmetric": lambda x, i, o, s: i / 2 * (1 - o / (s * i)) + (x + 0.5) / s - 0.5,
}
_NEAREST: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "round_prefer_floor": lambda x: np.ceil(x - 0.5),
    "round_prefer_ceil": lambda x: np.floor(x + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
}


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    """The cubic convolution kernel (Keys) with coefficient ``a`` at distances ``t``."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def resize_weights(n_in: int, n_out: int, scale: float, mode: str, coordinates: str, nearest_mode: str = "floor",
                   cubic_a: float = -0.75, exclude_outside: bool = False, antialias: bool = False) -> np.ndarray:
    """The [n_out, n_in] matrix of ONNX Resize along one axis: output = matrix @ input.

    Follows the ONNX specification: taps outside the input repeat the edge, or are dropped and
    the rest renormalised (``exclude_outside``); ``antialias`` widens the linear or cubic filter
    by 1/scale when downsampling.
    """
    x = _COORDINATES[coordinates](np.arange(n_out, dtype=np.float64), n_in, n_out, scale)
    if mode == "nearest":
        taps, weights = _NEAREST[nearest_mode](x)[:, None], np.ones((n_out, 1))
    else:
        stretch = min(scale, 1.0) if antialias else 1.0
        support = 1 if mode == "linear" else 2
        start = int(np.floor(-support / stretch)) + 1
        offsets = np.arange(start, 2 - start)
        base = np.floor(x)[:, None]
        distance = (offsets[None, :] - (x[:, None] - base)) * stretch
        weights = np.clip(1 - np.abs(distance), 0, 1) if mode == "linear" else _cubic(distance, cubic_a)
        weights = weights / weights.sum(axis=1, keepdims=True)
        taps = base + offsets[None, :]
        if exclude_outside:
            weights = np.where((taps >= 0) & (taps < n_in), weights, 0.0)
            weights = weights / weights.sum(axis=1, keepdims=True)
    matrix = np.zeros((n_out, n_in))
    rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
    np.add.at(matrix, (rows, np.clip(taps, 0, n_in - 1).astype(np.int64)), weights)
    return matrix


def _resize_scales(n: Node, rank: int) -> list[float] | None:
    """Resize's constant scales per axis (1 where ``axes`` leaves an axis out); None when sizes are given."""
    name = n.inputs[2] if len(n.inputs) > 2 else ""
    if not name:
        return None
    value = n.b.constant_value(name)
    if value is None:
        raise n.unsupported("scales computed at run time: export with constant scale factors or sizes")
    if value.size == 0:
        return None
    axes = [int(a) % rank for a in n.attr("axes") or range(rank)]  # type: ignore[attr-defined]
    scales = [1.0] * rank
    for axis, scale in zip(axes, value.reshape(-1)):
        scales[axis] = float(scale)
    return scales


SizeElement = int | tuple[str, int]
"""One element of a shape computed in the graph: a number, or (tensor, axis): that tensor's size along axis."""


def shape_elements(n: Node, name: str) -> list[SizeElement] | None:
    """The elements of the 1-D integer tensor ``name`` where it is assembled from constants and
    tensors' shapes (Shape, Gather, Slice, Concat, Cast, Squeeze, Unsqueeze: F.interpolate's
    ``size=x.shape[-2:]``); None where it is computed otherwise."""
    b = n.b
    value = b.constant_value(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = next((m for m in b.graph.node if name in m.output), None)
    if node is None:
        return None
    attrs = Node.of(node, b)
    if node.op_type == "Shape":
        axes = list(range(b.rank(node.input[0])))[slice(attrs.attr("start", 0), attrs.attr("end"))]  # type: ignore[misc]
        shape = b.info(node.input[0]).shape or ()
        return [shape[a] if isinstance(shape[a], int) else (node.input[0], a) for a in axes]
    parts = [shape_elements(n, i) for i in node.input[:1 if node.op_type != "Concat" else None]]
    if any(p is None for p in parts):
        return None
    if node.op_type == "Concat":
        return [e for p in parts for e in p]  # type: ignore[union-attr]
    if node.op_type in ("Cast", "Squeeze", "Unsqueeze", "Identity"):
        return parts[0]
    if node.op_type == "Gather":
        indices = b.constant_value(node.input[1])
        return None if indices is None else [parts[0][int(i)] for i in indices.reshape(-1)]  # type: ignore[index]
    if node.op_type == "Slice" and len(node.input) >= 3:
        bounds = [b.constant_value(i) if i else None for i in node.input[1:]]
        if any(v is None for v in bounds[:2]) or any(v is None for v, i in zip(bounds[2:], node.input[3:]) if i):
            return None
        step = int(bounds[3][0]) if len(bounds) > 3 and bounds[3] is not None else 1  # type: ignore[index]
        return parts[0][int(bounds[0][0]):int(bounds[1][0]):step]  # type: ignore[index]
    return None


def _resize_sizes(n: Node, rank: int) -> list[SizeElement | None] | None:
    """Resize's sizes per axis where the graph spells them (None for an axis ``axes`` leaves out, or all None)."""
    elements = shape_elements(n, n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] else None
    if elements is None:
        return None
    axes = [int(a) % rank for a in n.attr("axes") or range(rank)]  # type: ignore[attr-defined]
    sizes: list[SizeElement | None] = [None] * rank
    for axis, size in zip(axes, elements):
        sizes[axis] = size
    return sizes


def _same_size(n: Node, size: SizeElement | Dim | None, x: str, axis: int, size_in: Dim) -> bool:
    """Whether resized size ``size`` is certainly ``x``'s size along ``axis`` (``size_in``)."""
    if size is None:  # an axis Resize's axes leave out
        return True
    if isinstance(size, tuple):
        tensor, along = size
        shape = n.b.info(tensor).shape or ()
        return along == axis and (tensor == x or (len(shape) > along and shape[along] == size_in
                                                  and size_in is not None))
    return size == size_in and size is not None


def _along(g: V, matrix: np.ndarray, axis: int) -> V:
    """``g`` times ``matrix`` [O, I] contracted over its axis ``axis`` (negative, of length O)."""
    weights = V(g.b, g.b.constant(matrix, dtype=g.dtype))
    if axis == -1:
        return g @ weights
    if axis == -2:
        return weights.mT @ g
    perm = list(range(g.rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return (g.transpose(perm) @ weights).transpose(perm)


def _resize(n: Node, g: Grads) -> Grads:
    """Resize is linear and separable: along each resized axis the output is a
    constant matrix [out, in] (``resize_weights``) times the input, so the gradient is the
    transposed matrices applied to g, one MatMul per resized axis. Needs static sizes on the
    resized axes (an export at a fixed image size)."""
    x, y = n.x[0], n.y[0]
    if n.b.opset < 11:  # Resize-10 rounds nearest pixels as no later attribute says
        raise n.unsupported(f"Resize of opset {n.b.opset}: upgrade the model to opset 11 or later "
                            "(make_explainable does, keeping its coordinates)")
    mode = str(n.attr("mode", "nearest"))
    coordinates = str(n.attr("coordinate_transformation_mode", "half_pixel"))
    if coordinates not in _COORDINATES:
        raise n.unsupported(f"coordinate_transformation_mode {coordinates!r}")
    if mode not in ("nearest", "linear", "cubic"):
        raise n.unsupported(f"mode {mode!r}")
    if n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise n.unsupported(f"keep_aspect_ratio_policy {n.attr('keep_aspect_ratio_policy')!r}")
    in_shape, out_shape = x.info.shape, y.info.shape
    if in_shape is None or out_shape is None:
        raise n.unsupported("the input and output shapes are unknown")
    rank = len(in_shape)
    scales = _resize_scales(n, rank)
    sizes = _resize_sizes(n, rank) if scales is None else None
    wanted = [sizes[axis] if sizes is not None else size for axis, size in enumerate(out_shape)]
    kept = [(scales is not None and scales[axis] == 1.0) or _same_size(n, wanted[axis], x.name, axis, in_shape[axis])
            for axis in range(rank)]
    if all(kept):  # ONNX Runtime copies a Resize that keeps every size, whatever its scales say
        return (g[0],)
    grad = g[0]
    for axis, (size_in, size_out) in enumerate(zip(in_shape, out_shape)):
        scale = scales[axis] if scales is not None else None
        if scale == 1.0 or (scale is None and kept[axis]):
            continue
        size_out = wanted[axis] if isinstance(wanted[axis], int) else size_out
        if not isinstance(size_in, int) or not isinstance(size_out, int):
            raise n.unsupported(f"axis {axis} resized from {size_in} to {size_out}: the gradient needs static sizes "
                                "(export the model at a fixed image size)")
        matrix = resize_weights(size_in, size_out, size_out / size_in if scale is None else scale, mode, coordinates,
                                str(n.attr("nearest_mode", "round_prefer_floor")),
                                float(n.attr("cubic_coeff_a", -0.75)),  # type: ignore[arg-type]
                                bool(n.attr("exclude_outside", 0)), bool(n.attr("antialias", 0)))
        grad = _along(grad, matrix, axis - rank)
    return (_grad_of(x, grad.name),)


def _tile(n: Node, g: Grads) -> Grads:
    """g viewed as [K, r0, d0, r1, d1, ...] (r: the constant repeats, d: the input's sizes), summed over the r axes."""
    b, x = n.b, n.x[0]
    repeats = input_or_attr(n, 1, "repeats")
    rank = x.rank
    dims = [b.seeds]
    for axis, times in enumerate(repeats or []):
        dims += [b.ints([times]), b.shape_slice(n.inputs[0], axis, axis + 1)]
    split = g[0].op("Reshape", b.concat(dims, 0), info=TensorInfo(x.dtype, None))
    return (_grad_of(x, split.sum([2 * axis - 2 * rank for axis in range(rank)], keepdims=False).name), None)


def _depth_to_space(n: Node, g: Grads) -> Grads:
    """A permutation of elements: its gradient is the inverse permutation (SpaceToDepth for mode DCR)."""
    b, x = n.b, n.x[0]
    block = int(n.attr("blocksize"))  # type: ignore[arg-type]
    merged = b.merge_seeds(g[0].name, n.outputs[0])
    if n.attr("mode", "DCR") == "DCR":
        back = b.op("SpaceToDepth", [merged], blocksize=block)
    else:  # CRD: channel c * block^2 + i * block + j went to pixel (h * block + i, w * block + j) of channel c
        _, channels, height, width = b.static_shape(n.outputs[0], "the gradient of DepthToSpace")
        split = b.op("Reshape", [merged, b.ints([-1, channels, height // block, block, width // block, block])])  # type: ignore[operator]
        back = b.op("Transpose", [split], perm=[0, 1, 3, 5, 2, 4])
    return (V(b, back).reshape_like(x),)


def _space_to_depth(n: Node, g: Grads) -> Grads:
    """The inverse permutation: DepthToSpace in mode DCR."""
    b = n.b
    back = b.op("DepthToSpace", [b.merge_seeds(g[0].name, n.outputs[0])], blocksize=n.attr("blocksize"), mode="DCR")
    return (V(b, back).reshape_like(n.x[0]),)


# -- windows: convolution and pooling ----------------------------------------------------------
def _window_geometry(n: Node, kernel: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int]]:
    """Static (input size, output size, strides, dilations, leading pads, trailing pads) of a window operator."""
    in_size = list(n.b.static_shape(n.inputs[0], f"the gradient of {n.op_type}")[2:])
    out_size = list(n.b.static_shape(n.outputs[0], f"the gradient of {n.op_type}")[2:])
    strides, dilations, pads, end_pads = _window_pads(n, kernel)
    if n.attr("ceil_mode", 0) and any((o - 1) * s >= i + p for o, s, i, p in zip(out_size, strides, in_size, pads)):
        # ONNX shape inference before opset 22 keeps a last window that starts past the input;
        # ONNX Runtime (like ONNX 22 and PyTorch) drops it: the model's static shapes are wrong.
        raise n.unsupported(f"ceil_mode with a last window past the input (inferred output {out_size}): "
                            "ONNX shape inference before opset 22 disagrees with the runtime; export with opset 22")
    return in_size, out_size, strides, dilations, pads, end_pads


def _window_pads(n: Node, kernel: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """(strides, dilations, leading pads, trailing pads) of a window operator: from its attributes, and from
    its static sizes only for ``auto_pad`` SAME_* (so explicit pads work at a dynamic image size)."""
    spatial = len(kernel)
    strides = list(n.attr("strides") or [1] * spatial)  # type: ignore[arg-type]
    dilations = list(n.attr("dilations") or [1] * spatial)  # type: ignore[arg-type]
    auto_pad = n.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        both = list(n.attr("pads") or [0] * 2 * spatial) if auto_pad == "NOTSET" else [0] * 2 * spatial  # type: ignore[arg-type]
        return strides, dilations, both[:spatial], both[spatial:]
    in_size = n.b.static_shape(n.inputs[0], f"the gradient of {n.op_type} with auto_pad {auto_pad}")[2:]
    out_size = n.b.static_shape(n.outputs[0], f"the gradient of {n.op_type} with auto_pad {auto_pad}")[2:]
    totals = [max((o - 1) * s + (k - 1) * d + 1 - i, 0)
              for i, o, s, k, d in zip(in_size, out_size, strides, kernel, dilations)]
    pads = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
    return strides, dilations, pads, [t - p for t, p in zip(totals, pads)]


def _scatter_windows(n: Node, g_merged: str, weight: str, group: int, kernel: Sequence[int]) -> V:
    """ConvTranspose of window gradients, cropped (or zero-padded) back onto the input.

    The transposed convolution covers ``(out - 1) * stride + (k - 1) * dilation + 1`` positions
    starting at the leading pad; the input occupies ``[pad, pad + in)`` of that.
    """
    b = n.b
    in_size, out_size, strides, dilations, pads, _ = _window_geometry(n, kernel)
    full = b.op("ConvTranspose", [g_merged, weight], strides=strides, dilations=dilations, group=group)
    covered = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out_size, strides, kernel, dilations)]
    ends = [min(p + i, c) for p, i, c in zip(pads, in_size, covered)]
    spatial_axes = list(range(2, 2 + len(kernel)))
    cropped = b.op("Slice", [full, b.ints(pads), b.ints(ends), b.ints(spatial_axes)])
    short = [p + i - e for p, i, e in zip(pads, in_size, ends)]
    if any(short):
        cropped = b.op("Pad", [cropped, b.ints([0] * (2 + len(kernel)) + [0, 0] + short)])
    return V(b, cropped).reshape_like(n.x[0])


def _conv(n: Node, g: Grads) -> Grads:
    """A stride-1 Conv's input gradient is itself a Conv (``_correlate_back``); a strided one's scatters
    the window gradients with ConvTranspose."""
    kernel = list(n.attr("kernel_shape") or n.b.static_shape(n.inputs[1], "the gradient of Conv")[2:])  # type: ignore[arg-type]
    merged = n.b.merge_seeds(g[0].name, n.outputs[0])
    group = int(n.attr("group", 1))  # type: ignore[arg-type]
    if all(s == 1 for s in n.attr("strides") or [1]):  # type: ignore[union-attr]
        weight = _back_weight(n, group, len(kernel))
        if weight is not None:
            return (_correlate_back(n, merged, weight, group, kernel), None, None)
    return (_scatter_windows(n, merged, n.inputs[1], group, kernel), None, None)


def _back_weight(n: Node, group: int, spatial: int) -> str | None:
    """The stride-1 Conv's weight [C_out, C_in / group, k...] as the weight of its gradient's Conv: spatially
    flipped, input and output channels swapped within each group ([C_in, C_out / group, k...]). Computed here
    for a constant weight or an int8 QDQ model's dequantized one (no per-call work, a plain initializer for
    TensorRT too); built with Reshape, Transpose and a reversing Slice for another computed one; None when
    that one's shape is not static (the ConvTranspose form takes it)."""
    b, weight = n.b, n.inputs[1]
    value = b.weight_value(weight)
    info = b.infos.get(weight)
    shape = (info.shape if info is not None else None) if value is None else value.shape
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    c_out, c_in_group, *kernel = shape
    grouped = [group, c_out // group, c_in_group, *kernel]
    swapped = [0, 2, 1, *range(3, 3 + spatial)]
    back_shape = [group * c_in_group, c_out // group, *kernel]
    if value is not None:
        flipped = value.reshape(grouped).transpose(swapped).reshape(back_shape)[(slice(None), slice(None)) + (slice(None, None, -1),) * spatial]
        return b.constant(np.ascontiguousarray(flipped), dtype=helper.np_dtype_to_tensor_dtype(flipped.dtype))
    split = b.op("Reshape", [weight, b.ints(grouped)])
    merged = b.op("Reshape", [b.op("Transpose", [split], perm=swapped), b.ints(back_shape)])
    axes = list(range(2, 2 + spatial))
    return b.op("Slice", [merged, b.ints([-1] * spatial), b.ints([np.iinfo(np.int64).min] * spatial), b.ints(axes),
                          b.ints([-1] * spatial)])


def _correlate_back(n: Node, g_merged: str, back_weight: str, group: int, kernel: Sequence[int]) -> V:
    """The input gradient of a stride-1 Conv, ``y[j] = sum_k x[j - pad + k d] w[k]``, as a Conv of the window
    gradients with the flipped weight: ``gx[i] = sum_k' gy[i - (d (k - 1) - pad) + k' d] w[k - 1 - k']``,
    i.e. leading pads ``d (k - 1) - pad`` and trailing pads ``d (k - 1) - end_pad``. ONNX Runtime's Conv
    (NCHWc layout, no col2im) is much faster than its ConvTranspose. A negative pad (a pad wider than the
    dilated kernel) drops window gradients that reach no input: a Slice of them first. Nothing here needs the
    image size (explicit pads), so a model exported with a dynamic size keeps it."""
    b = n.b
    _, dilations, pads, end_pads = _window_pads(n, kernel)
    reach = [d * (k - 1) for d, k in zip(dilations, kernel)]
    lead = [r - p for r, p in zip(reach, pads)]
    trail = [r - e for r, e in zip(reach, end_pads)]
    if any(v < 0 for v in lead + trail):  # ends counted from the end: no static size needed
        starts = [max(-v, 0) for v in lead]
        ends = [v if v < 0 else np.iinfo(np.int64).max for v in trail]
        g_merged = b.op("Slice", [g_merged, b.ints(starts), b.ints(ends), b.ints(list(range(2, 2 + len(kernel))))])
    back = b.op("Conv", [g_merged, back_weight], dilations=dilations, group=group,
                pads=[max(v, 0) for v in lead] + [max(v, 0) for v in trail])
    return V(b, back).reshape_like(n.x[0])


def _conv_transpose(n: Node, g: Grads) -> Grads:
    """ConvTranspose scatters each input pixel through the kernel; its gradient gathers g back
    through the same kernel: a Conv with the same weights, strides, dilations, groups and pads
    (the weight layout [C_in, C_out / group, k...] is the Conv's from g's channels to x's). The
    Conv's output has the input's size: floor(((in - 1) * stride + output_padding) / stride) + 1,
    output_padding < stride (ONNX Runtime refuses larger ones)."""
    b, x = n.b, n.inputs[0]
    if n.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or n.attr("output_shape"):
        raise n.unsupported("auto_pad SAME_* or output_shape: export with explicit pads")
    spatial = b.rank(x) - 2
    strides = list(n.attr("strides") or [1] * spatial)  # type: ignore[arg-type]
    dilations = list(n.attr("dilations") or [1] * spatial)  # type: ignore[arg-type]
    pads = list(n.attr("pads") or [0] * 2 * spatial) if n.attr("auto_pad", "NOTSET") == "NOTSET" else [0] * 2 * spatial  # type: ignore[arg-type]
    merged = b.merge_seeds(g[0].name, n.outputs[0])
    back = b.op("Conv", [merged, n.inputs[1]], strides=strides, dilations=dilations, pads=pads,
                group=int(n.attr("group", 1)))  # type: ignore[arg-type]
    return (V(b, back).reshape_like(n.x[0]), None, None)


def _channels(n: Node) -> int:
    return n.b.static_shape(n.inputs[0], f"the gradient of {n.op_type}")[1]


def _average_pool(n: Node, g: Grads) -> Grads:
    """Each output's gradient is shared by its window: divide by the window's count, scatter ones."""
    kernel = list(n.attr("kernel_shape"))  # type: ignore[arg-type]
    in_size, out_size, strides, dilations, pads, end_pads = _window_geometry(n, kernel)
    if any(d != 1 for d in dilations):
        raise n.unsupported("dilated AveragePool")
    include_pad = int(n.attr("count_include_pad", 0))  # type: ignore[arg-type]
    counts = np.ones(out_size, dtype=np.float64)
    for axis, (i, o, s, k, p, e) in enumerate(zip(in_size, out_size, strides, kernel, pads, end_pads)):
        start = np.arange(o) * s - p
        lo, hi = (-p, i + e) if include_pad else (0, i)
        valid = np.minimum(start + k, hi) - np.maximum(start, lo)
        counts = counts * valid.reshape([-1 if a == axis else 1 for a in range(len(kernel))])
    divided = g[0] / counts
    channels = _channels(n)
    ones = n.b.constant(np.ones([channels, 1, *kernel]), dtype=divided.dtype)
    return (_scatter_windows(n, n.b.merge_seeds(divided.name, n.outputs[0]), ones, channels, kernel),)


def _max_pool(n: Node, g: Grads) -> Grads:
    """Route each output's gradient to the first maximum of its window (row-major order), as torch does.

    Built without MaxPool's Indices output (which TensorRT lacks): for every kernel offset,
    the strided view of the padded input is compared with the pooled output; an offset takes
    the gradient where it equals the maximum and no earlier offset did. A grouped ConvTranspose
    with one-hot kernels puts all offsets back in place at once.
    """
    if len(n.outputs) > 1 and n.outputs[1]:
        raise n.unsupported("MaxPool with an Indices output")
    b, x, y = n.b, n.inputs[0], n.y[0]
    kernel = list(n.attr("kernel_shape"))  # type: ignore[arg-type]
    in_size, out_size, strides, dilations, pads, _ = _window_geometry(n, kernel)
    covered = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out_size, strides, kernel, dilations)]
    after = [max(c - p - i, 0) for c, p, i in zip(covered, pads, in_size)]
    padded = b.op("Pad", [x, b.ints([0, 0, *pads, 0, 0, *after]), b.scalar_like(-np.inf, x)], like=x)
    spatial_axes = list(range(2, 2 + len(kernel)))
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    taken: V | None = None
    routed = []
    for offset in offsets:
        starts = [o * d for o, d in zip(offset, dilations)]
        ends = [s + (o - 1) * st + 1 for s, o, st in zip(starts, out_size, strides)]
        view = V(b, b.op("Slice", [padded, b.ints(starts), b.ints(ends), b.ints(spatial_axes), b.ints(strides)]), y.info)
        hit = view == y
        first = hit if taken is None else hit & ~taken
        taken = hit if taken is None else taken | hit
        routed.append(where(first, g[0], 0).unsqueeze([-len(kernel) - 1]).name)
    stacked = b.concat(routed, -len(kernel) - 1)  # [K, N, C, offsets, *out]
    channels = _channels(n)
    merged = b.op("Reshape", [stacked, b.ints([-1, channels * len(offsets), *out_size])])
    one_hot = np.zeros([channels, len(offsets), 1, *kernel])
    for index, offset in enumerate(offsets):
        one_hot[(slice(None), index, 0, *offset)] = 1.0
    weight = b.constant(one_hot.reshape([channels * len(offsets), 1, *kernel]), dtype=b.info(x).elem_type)
    return (_scatter_windows(n, merged, weight, channels, kernel),)


# -- quantization: the straight-through estimator ----------------------------------------------
_INTEGER_RANGES = {
    TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT16: (0, 65535), TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
}


def _quantization(n: Node, x: V) -> tuple[V, V]:
    """The node's scale and zero point as values of ``x``'s float type, shaped to broadcast
    against ``x`` (a per-axis scale [C] gets trailing size-1 axes after ``axis``)."""
    if int(n.attr("block_size", 0)):  # type: ignore[arg-type]
        raise n.unsupported("blocked quantization (block_size)")
    scale, zero = n.x[1], n.input(2)
    float_type = scale.dtype
    zero = V(n.b, n.b.scalar_like(0.0, n.inputs[1])) if zero is None else zero.cast(float_type)
    if scale.rank == 1 and x.rank > 1:
        trailing = list(range(neg_axis(int(n.attr("axis", 1)), x.rank) + 1, 0))  # type: ignore[arg-type]
        scale, zero = scale.unsqueeze(trailing), zero.unsqueeze(trailing) if zero.rank == 1 else zero
    return scale, zero


def _quantize_linear(n: Node, g: Grads) -> Grads:
    """QuantizeLinear, q = clip(round(x / scale) + zero, qmin, qmax), by the straight-through
    estimator of quantization-aware training: rounding counts as the identity, clipping does not.

    Convention (``_dequantize_linear`` holds the other half): the gradient of the integer output
    is in units of the float value per integer step, so Quantize passes ``g / scale`` to ``x``
    inside the representable range [scale (qmin - zero), scale (qmax - zero)] and 0 outside, and
    Dequantize passes ``g * scale`` back to its integer input. A Quantize -> Dequantize pair with
    one scale is then the clipped straight-through estimator: g inside the range, 0 outside.
    """
    x, q = n.x[0], n.y[0]
    if q.dtype not in _INTEGER_RANGES:
        raise n.unsupported(f"quantization to element type {TensorProto.DataType.Name(q.dtype)}")
    scale, zero = _quantization(n, x)
    low, high = _INTEGER_RANGES[q.dtype]
    inside = ((low - zero) * scale <= x) & (x <= (high - zero) * scale)
    gq = V(n.b, g[0].name, TensorInfo(x.dtype, q.info.shape), seeded=True)  # the integer output's float gradient
    return (where(inside, gq / scale, 0), None, None)


def _dequantize_linear(n: Node, g: Grads) -> Grads:
    """x = (q - zero) * scale: the integer input gets g * scale (see ``_quantize_linear``)."""
    q = n.x[0]
    scale, _ = _quantization(n, q)
    gq = g[0] * scale  # a float gradient of the integer input
    return (V(n.b, gq.name, TensorInfo(scale.dtype, q.info.shape), seeded=True), None, None)


def refused(reason: str) -> Rule:
    """A rule for an operator the gradient must not cross: it raises ``reason``. Marked to be run on
    every node between the explained layer and the output, even one reached only through integer
    tensors (NonMaxSuppression's indices, QLinearConv's uint8 values)."""

    def rule(n: Node, g: Grads) -> Grads:
        raise n.unsupported(reason)

    return blocks_path(rule)


QOPERATOR_HINT = ("a quantized operator of the QOperator format has no gradient: quantize the model in the QDQ "
                  "format instead (onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QDQ)), "
                  "whose QuantizeLinear/DequantizeLinear pairs take the straight-through gradient")
QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul",
                 "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
                 "QLinearSoftmax", "QLinearReduceMean", "QGemm", "QAttention", "DynamicQuantizeLinear")
"""Operators of onnxruntime.quantization's QOperator format (integer in, integer out)."""
_POST_PROCESSING = ("detection post-processing (non-maximum suppression, top-k selection) has no useful gradient: "
                    "explain the raw head output before it (pass its tensor name as output=/logits=)")
REFUSED: dict[str, str] = {
    **dict.fromkeys(QOPERATOR_OPS, QOPERATOR_HINT),
    "NonMaxSuppression": _POST_PROCESSING,
    "TopK": _POST_PROCESSING,
}
"""Operators refused with a hint (``refused``): no gradient, and what to do instead."""


RULES: dict[str, Rule] = {
    # identity-like
    "Identity": elementwise(lambda n, g, x, y: g),
    "Dropout": lambda n, g: (g[0],),
    "Cast": elementwise(lambda n, g, x, y: g.cast(x.dtype)),
    # element-wise: unbroadcast sums a gradient back to its input's shape
    "Add": elementwise(lambda n, g, a, b, y: (g.unbroadcast(a), g.unbroadcast(b))),
    "Sub": elementwise(lambda n, g, a, b, y: (g.unbroadcast(a), (-g).unbroadcast(b))),
    "Mul": elementwise(_mul),
    "Div": elementwise(_div),
    "Pow": elementwise(lambda n, g, x, p, y: ((g * (p.cast(x.dtype) * x ** (p - 1))).unbroadcast(x), None)),
    "Sum": lambda n, g: [g[0].unbroadcast(x) for x in n.x],
    "Mean": _mean,
    "Max": _extremum,
    "Min": _extremum,
    "Where": elementwise(lambda n, g, c, a, b, y: (None, where(c, g, 0).unbroadcast(a), where(c, 0, g).unbroadcast(b))),
    "Expand": elementwise(lambda n, g, x, shape, y: g.unbroadcast(x)),
    "Neg": elementwise(lambda n, g, x, y: -g),
    # from the output: the input is often a Conv or Add output ONNX Runtime fuses into the Relu
    "Relu": elementwise(lambda n, g, x, y: where(y > 0, g, 0)),
    "LeakyRelu": elementwise(lambda n, g, x, y: where(x > 0, g, g * float(n.attr("alpha", 0.01)))),
    "PRelu": elementwise(lambda n, g, x, slope, y: (where(x > 0, g, g * slope), None)),
    "Clip": _clip,
    "HardSigmoid": elementwise(_hard_sigmoid),
    # y = x * clip(x/6 + 1/2, 0, 1)
    "HardSwish": elementwise(lambda n, g, x, y: g * where(x > 3, 1, where(x < -3, 0, x / 3 + 0.5))),
    "Sigmoid": elementwise(_sigmoid),
    "Tanh": elementwise(lambda n, g, x, y: g * (1 - y * y)),
    "Exp": elementwise(lambda n, g, x, y: g * y),
    "Log": elementwise(lambda n, g, x, y: g / x),
    "Sqrt": elementwise(lambda n, g, x, y: g / (2 * y)),
    "Reciprocal": elementwise(lambda n, g, x, y: g * -(y * y)),
    "Abs": elementwise(lambda n, g, x, y: g * x.sign()),
    "Softplus": elementwise(lambda n, g, x, y: g * x.sigmoid()),
    "Erf": elementwise(lambda n, g, x, y: g * (2 / math.sqrt(math.pi) * (-x * x).exp())),
    "Gelu": elementwise(_gelu),
    # shape and selection
    "Reshape": _reshaped,
    "Flatten": _reshaped,
    "Squeeze": _reshaped,
    "Unsqueeze": _reshaped,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "GatherElements": _gather_elements,
    "Pad": _pad,
    # reductions and pooling
    "GlobalAveragePool": _reduce_mean,
    "ReduceMean": _reduce_mean,
    "ReduceSum": _reduce_sum,
    "ReduceL2": _reduce_l2,
    "ReduceL1": _reduce_l1,
    "GlobalMaxPool": _extreme_reduce,
    "ReduceMax": _extreme_reduce,
    "ReduceMin": _extreme_reduce,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
    # linear algebra and normalisation
    "MatMul": _matmul,
    "Einsum": _einsum,
    "Gemm": _gemm,
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "GroupNormalization": _group_norm,
    "LpNormalization": _lp_normalization,
    "ConvTranspose": _conv_transpose,
    # resampling and rearranging
    "Resize": _resize,
    "Tile": _tile,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    # quantization (QDQ format)
    "QuantizeLinear": through_integers(_quantize_linear),
    "DequantizeLinear": _dequantize_linear,
    **{op: refused(reason) for op, reason in REFUSED.items()},
}
