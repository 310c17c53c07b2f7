"""One vector-Jacobian-product rule per ONNX operator, built from plain inference operators.

A rule takes the builder, the forward node and the gradients of the node's outputs (``None``
where no gradient flows) and returns one gradient per input (``None`` for inputs that take none,
such as shapes and indices). Gradients carry a leading seed axis (see ``gradients.py``), so a
gradient of forward tensor ``x`` has shape ``[K, *shape(x)]``; axes are therefore always given as
negative numbers, which mean the same thing with or without the seed axis.

Short rules are one line in the table at the bottom; longer ones are named functions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from explainrt.export.gradients import GradientBuilder as B
from explainrt.export.gradients import Node

Grads = Sequence[str | None]
Rule = Callable[[B, Node, Grads], Sequence[str | None]]


# -- small expression helpers (every one appends nodes) -------------------------------------
def mul(b: B, x: str, y: str) -> str:
    return b.op("Mul", [x, y], like=x)


def scale(b: B, x: str, factor: float, like: str) -> str:
    return x if factor == 1.0 else mul(b, x, b.scalar_like(factor, like))


def where(b: B, condition: str, g: str, like: str, otherwise: str | None = None) -> str:
    """``g`` where ``condition`` holds, else ``otherwise`` (zero by default)."""
    return b.op("Where", [condition, g, otherwise or b.scalar_like(0.0, like)], like=g)


def compare(b: B, op_type: str, x: str, value: float) -> str:
    return b.op(op_type, [x, b.scalar_like(value, x)])


def neg_axis(axis: int, rank: int) -> int:
    """An axis as a negative number, valid with and without the leading seed axis."""
    return axis - rank if axis >= 0 else axis


def input_or_attr(b: B, n: Node, index: int, attr: str) -> list[int] | None:
    """Operator arguments that moved from attributes to constant inputs across opsets."""
    if len(n.inputs) > index and n.inputs[index]:
        value = b.constant_value(n.inputs[index])
        if value is None:
            raise n.unsupported(f"input {index} ({attr}) must be a constant for the gradient")
        return [int(v) for v in value.reshape(-1)]
    value = n.attr(attr)
    return None if value is None else [int(v) for v in value]  # type: ignore[union-attr]


def chain(derivative: Callable[[B, Node], str]) -> Rule:
    """Rule of an element-wise unary operator: gradient times its derivative."""
    return lambda b, n, g: (mul(b, g[0], derivative(b, n)),)


# -- element-wise binary operators -----------------------------------------------------------
def _binary(b: B, n: Node, ga: str | None, gb: str | None) -> tuple[str | None, str | None]:
    out = b.shape_of(n.outputs[0])
    a, c = n.inputs[:2]
    return (b.unbroadcast(ga, a, out) if ga else None, b.unbroadcast(gb, c, out) if gb else None)


def _sub(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    return _binary(b, n, g[0], b.op("Neg", [g[0]], like=g[0]))


def _mul(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    a, c = n.inputs[:2]
    return _binary(b, n, mul(b, g[0], c), mul(b, g[0], a))


def _div(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    a, c = n.inputs[:2]
    ga = b.op("Div", [g[0], c], like=g[0])
    gc = b.op("Neg", [mul(b, ga, n.outputs[0])], like=g[0])  # -g * a / c^2 = -(g / c) * y
    return _binary(b, n, ga, gc)


def _variadic(b: B, n: Node, g: Grads, masks: Sequence[str | None], factor: float = 1.0) -> list[str]:
    out = b.shape_of(n.outputs[0])
    term = scale(b, g[0], factor, n.outputs[0])
    return [b.unbroadcast(term if m is None else where(b, m, term, term), x, out) for x, m in zip(n.inputs, masks)]


def _extremum(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """Max/Min: the gradient goes to the input(s) equal to the result."""
    return _variadic(b, n, g, [b.op("Equal", [x, n.outputs[0]]) for x in n.inputs])


def _where_rule(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    condition, a, c = n.inputs
    zero = b.scalar_like(0.0, g[0])
    out = b.shape_of(n.outputs[0])
    return (None,
            b.unbroadcast(where(b, condition, g[0], g[0]), a, out),
            b.unbroadcast(b.op("Where", [condition, zero, g[0]], like=g[0]), c, out))


# -- element-wise unary derivatives ----------------------------------------------------------
def _clip(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """Pass the gradient strictly inside [min, max].

    The mask reads the output (min < y < max holds exactly where min < x < max) so that ONNX
    Runtime can still fuse the Conv producing x with this Clip (ReLU6).
    """
    y = n.outputs[0]
    bounds = [("Greater", n.inputs[1] if len(n.inputs) > 1 else ""), ("Less", n.inputs[2] if len(n.inputs) > 2 else "")]
    masks = [b.op(op_type, [y, bound]) for op_type, bound in bounds if bound]
    if not masks:
        return (g[0],)
    inside = masks[0] if len(masks) == 1 else b.op("And", masks)
    return (where(b, inside, g[0], y),)


def _hard_sigmoid(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    x, alpha = n.inputs[0], float(n.attr("alpha", 0.2))
    z = b.op("Add", [scale(b, x, alpha, x), b.scalar_like(float(n.attr("beta", 0.5)), x)], like=x)
    inside = b.op("And", [compare(b, "Greater", z, 0.0), compare(b, "Less", z, 1.0)])
    return (where(b, inside, scale(b, g[0], alpha, x), x),)


def _hard_swish(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """y = x * clip(x/6 + 1/2, 0, 1): dy/dx = 0 below -3, 1 above 3, x/3 + 1/2 between."""
    x = n.inputs[0]
    ramp = b.op("Add", [scale(b, x, 1.0 / 3.0, x), b.scalar_like(0.5, x)], like=x)
    slope = where(b, compare(b, "Greater", x, 3.0), b.scalar_like(1.0, x), x, otherwise=ramp)
    slope = where(b, compare(b, "Less", x, -3.0), b.scalar_like(0.0, x), x, otherwise=slope)
    return (mul(b, g[0], slope),)


def _erf_derivative(b: B, x: str) -> str:
    """d erf(x) / dx = 2 / sqrt(pi) * exp(-x^2)."""
    exp = b.op("Exp", [b.op("Neg", [mul(b, x, x)], like=x)], like=x)
    return scale(b, exp, 2.0 / math.sqrt(math.pi), x)


def _gelu(b: B, n: Node) -> str:
    x = n.inputs[0]
    if n.attr("approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        x2 = mul(b, x, x)
        inner = mul(b, x, b.op("Add", [b.scalar_like(1.0, x), scale(b, x2, 0.044715, x)], like=x))
        t = b.op("Tanh", [scale(b, inner, c, x)], like=x)
        sech2 = b.op("Sub", [b.scalar_like(1.0, x), mul(b, t, t)], like=x)
        d_inner = b.op("Add", [b.scalar_like(c, x), scale(b, x2, 3 * 0.044715 * c, x)], like=x)
        half_one_plus_t = scale(b, b.op("Add", [b.scalar_like(1.0, x), t], like=x), 0.5, x)
        return b.op("Add", [half_one_plus_t, scale(b, mul(b, mul(b, x, sech2), d_inner), 0.5, x)], like=x)
    # exact: Phi(x) + x * phi(x)
    cdf = scale(b, b.op("Add", [b.scalar_like(1.0, x), b.op("Erf", [scale(b, x, 1 / math.sqrt(2), x)], like=x)], like=x), 0.5, x)
    pdf = scale(b, b.op("Exp", [scale(b, mul(b, x, x), -0.5, x)], like=x), 1 / math.sqrt(2 * math.pi), x)
    return b.op("Add", [cdf, mul(b, x, pdf)], like=x)


def _one_minus(b: B, x: str) -> str:
    return b.op("Sub", [b.scalar_like(1.0, x), x], like=x)


def _pow(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    x, p = n.inputs
    p_minus_one = b.op("Sub", [p, b.constant(1, dtype=b.info(p).elem_type)], like=p)
    d = mul(b, b.op("Pow", [x, p_minus_one], like=x), b.op("Cast", [p], to=b.info(x).elem_type))
    return (b.unbroadcast(mul(b, g[0], d), x, b.shape_of(n.outputs[0])), None)


# -- reshaping, reordering, selection ----------------------------------------------------------
def _reshaped(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    return (b.like_input(g[0], n.inputs[0]),)


def _transpose(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    rank = b.rank(n.inputs[0])
    perm = list(n.attr("perm") or reversed(range(rank)))  # type: ignore[arg-type]
    inverse = [perm.index(axis) for axis in range(rank)]
    return (b.op("Transpose", [g[0]], perm=[0] + [p + 1 for p in inverse], like=n.inputs[0]),)


def _concat(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    axis = int(n.attr("axis"))  # type: ignore[arg-type]
    rank = b.rank(n.inputs[0])
    pos = axis % rank
    sizes = b.concat([b.shape_slice(x, pos, pos + 1) for x in n.inputs], 0)
    parts = b.op_multi("Split", [g[0], sizes], outputs=len(n.inputs), axis=neg_axis(axis, rank))
    return parts


def _split(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    rank = b.rank(n.inputs[0])
    parts = [gy if gy else b.zeros_grad(y) for y, gy in zip(n.outputs, g)]
    return (b.concat(parts, neg_axis(int(n.attr("axis", 0)), rank)),)  # type: ignore[arg-type]


def _slice(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """Slices with unit steps: pad the gradient back with zeros."""
    x = n.inputs[0]
    shape = b.static_shape(x, "the gradient of Slice")
    rank = len(shape)
    starts, ends = input_or_attr(b, n, 1, "starts"), input_or_attr(b, n, 2, "ends")
    axes = input_or_attr(b, n, 3, "axes") or list(range(len(starts or [])))
    steps = input_or_attr(b, n, 4, "steps") or [1] * len(axes)
    if any(s != 1 for s in steps):
        raise n.unsupported("slices with steps other than 1")
    before, after = [0] * (rank + 1), [0] * (rank + 1)
    for axis, start, end in zip(axes, starts or [], ends or []):
        axis %= rank
        if not isinstance(shape[axis], int):
            raise n.unsupported(f"slicing along the dynamic axis {axis}")
        lo, hi, _ = slice(start, end).indices(shape[axis])
        before[axis + 1], after[axis + 1] = lo, shape[axis] - max(hi, lo)
    return (b.op("Pad", [g[0], b.ints(before + after)], like=x),)


def _gather(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """Scatter-add the gathered gradient back into a zero tensor shaped like the data."""
    data, indices = n.inputs
    rank = b.rank(data)
    axis = int(n.attr("axis", 0)) % rank  # type: ignore[arg-type]
    flat_grad_shape = b.concat([b.seeds, b.shape_slice(data, 0, axis), b.ints([-1]), b.shape_slice(data, axis + 1)], 0)
    g_flat = b.op("Reshape", [g[0], flat_grad_shape], like=data)
    flat_indices = b.op("Reshape", [indices, b.ints([-1])])
    dim = b.op("Gather", [b.shape(data), b.ints([axis])])
    wrapped = b.op("Where", [b.op("Less", [flat_indices, b.ints([0])]), b.op("Add", [flat_indices, dim]), flat_indices])
    placed = b.op("Reshape", [wrapped, b.ints([1] * (axis + 1) + [-1] + [1] * (rank - axis - 1))])
    expanded = b.op("Expand", [placed, b.shape(g_flat)])
    if b.opset < 16:  # ScatterElements adds repeated indices' gradients only from opset 16 on
        known = b.constant_value(indices)
        size = b.shape_of(data)[axis]
        if known is None or not isinstance(size, int) or len(np.unique(known % size)) != known.size:
            raise n.unsupported(f"indices that may repeat need ScatterElements(reduction='add'), opset 16 (model: {b.opset})")
    reduction = {"reduction": "add"} if b.opset >= 16 else {}
    return (b.op("ScatterElements", [b.zeros_grad(data), expanded, g_flat], axis=axis + 1, like=data, **reduction), None)


# -- reductions --------------------------------------------------------------------------------
def _reduced_axes(b: B, n: Node) -> list[int]:
    rank = b.rank(n.inputs[0])
    if n.op_type.startswith("Global"):
        return list(range(2 - rank, 0))
    axes = input_or_attr(b, n, 1, "axes")
    if not axes:
        return [] if n.attr("noop_with_empty_axes", 0) else list(range(-rank, 0))
    return sorted(neg_axis(a, rank) for a in axes)


def _keep_dims(b: B, n: Node, t: str) -> str:
    """A reduction's result (or its gradient) with the reduced axes kept as size 1."""
    keeps = n.op_type.startswith("Global") or n.attr("keepdims", 1)
    return t if keeps else b.unsqueeze(t, _reduced_axes(b, n))


def _mean(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """ReduceMean and GlobalAveragePool: spread evenly; size(y)/size(x) is 1/count."""
    x, y = n.inputs[0], n.outputs[0]
    dtype = b.info(x).elem_type
    ratio = b.op("Div", [b.op("Cast", [b.op("Size", [y])], to=dtype), b.op("Cast", [b.op("Size", [x])], to=dtype)])
    spread = b.op("Expand", [_keep_dims(b, n, g[0]), b.grad_shape(x)], like=x)
    return (mul(b, spread, ratio), None)


def _sum(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    return (b.op("Expand", [_keep_dims(b, n, g[0]), b.grad_shape(n.inputs[0])], like=n.inputs[0]), None)


def _extreme_reduce(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """ReduceMax/ReduceMin/GlobalMaxPool: shared equally among the inputs equal to the result."""
    x = n.inputs[0]
    hits = b.op("Equal", [x, _keep_dims(b, n, n.outputs[0])])
    count = b.reduce("ReduceSum", b.op("Cast", [hits], to=b.info(x).elem_type), _reduced_axes(b, n))
    share = b.op("Div", [_keep_dims(b, n, g[0]), count], like=x)
    return (where(b, hits, share, x), None)


def _softmax(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    y = n.outputs[0]
    axis = neg_axis(int(n.attr("axis", -1)), b.rank(y))  # type: ignore[arg-type]
    gy = mul(b, g[0], y)
    return (b.op("Sub", [gy, mul(b, y, b.reduce("ReduceSum", gy, [axis]))], like=y),)


def _log_softmax(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    y = n.outputs[0]
    axis = neg_axis(int(n.attr("axis", -1)), b.rank(y))  # type: ignore[arg-type]
    softmax = b.op("Exp", [y], like=y)
    return (b.op("Sub", [g[0], mul(b, softmax, b.reduce("ReduceSum", g[0], [axis]))], like=y),)


# -- linear algebra ----------------------------------------------------------------------------
def _swap_last(b: B, x: str, rank: int) -> str:
    perm = list(range(rank))
    perm[-2:] = perm[-1], perm[-2]
    return b.op("Transpose", [x], perm=perm, like=x)


def _matmul(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    a, c = n.inputs
    ra, rc = b.rank(a), b.rank(c)
    if ra < 2 or rc < 2:
        raise n.unsupported("MatMul with a 1-D operand")
    out = b.shape_of(n.outputs[0])
    ga = b.op("MatMul", [g[0], _swap_last(b, c, rc)], like=a)
    gc = b.op("MatMul", [_swap_last(b, a, ra), g[0]], like=c)
    return (b.unbroadcast(ga, a, out[:-2] + b.shape_of(a)[-2:]),
            b.unbroadcast(gc, c, out[:-2] + b.shape_of(c)[-2:]))


def _gemm(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """Y = alpha * A' B' + beta * C with A' = A or A^T, B' = B or B^T (2-D operands)."""
    a, c = n.inputs[:2]
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    trans_a, trans_b = int(n.attr("transA", 0)), int(n.attr("transB", 0))
    b_prime_t = c if trans_b else _swap_last(b, c, 2)
    a_prime_t = _swap_last(b, a, 2) if not trans_a else a
    ga = scale(b, b.op("MatMul", [g[0], b_prime_t], like=a), alpha, a)
    gc = scale(b, b.op("MatMul", [a_prime_t, g[0]], like=c), alpha, c)
    grads: list[str | None] = [_swap_last(b, ga, 3) if trans_a else ga, _swap_last(b, gc, 3) if trans_b else gc]
    if len(n.inputs) > 2 and n.inputs[2]:
        grads.append(b.unbroadcast(scale(b, g[0], beta, a), n.inputs[2], b.shape_of(n.outputs[0])))
    return grads


# -- normalisation -----------------------------------------------------------------------------
def _batch_norm(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """Inference-mode BatchNormalization is a per-channel affine map: g * scale / sqrt(var + eps)."""
    if int(n.attr("training_mode", 0)):
        raise n.unsupported("training_mode=1")
    x, gamma, _, _, var = n.inputs[:5]
    std = b.op("Sqrt", [b.op("Add", [var, b.scalar_like(float(n.attr("epsilon", 1e-5)), var)], like=var)], like=var)
    factor = b.op("Div", [gamma, std], like=var)
    per_channel = b.op("Reshape", [factor, b.ints([-1] + [1] * (b.rank(x) - 2))], like=var)
    return (mul(b, g[0], per_channel),)


def _layer_norm(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """dx = inv_std * (gh - mean(gh) - xhat * mean(gh * xhat)), gh = g * scale, over normalised axes."""
    x, gamma = n.inputs[:2]
    rank = b.rank(x)
    first = int(n.attr("axis", -1)) % rank  # type: ignore[arg-type]
    axes = list(range(first - rank, 0))
    centred = b.op("Sub", [x, b.reduce("ReduceMean", x, axes)], like=x)
    variance = b.reduce("ReduceMean", mul(b, centred, centred), axes)
    eps = b.scalar_like(float(n.attr("epsilon", 1e-5)), x)
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [variance, eps], like=x)], like=x)], like=x)
    x_hat = mul(b, centred, inv_std)
    gh = mul(b, g[0], gamma)
    inner = b.op("Sub", [b.op("Sub", [gh, b.reduce("ReduceMean", gh, axes)], like=x),
                         mul(b, x_hat, b.reduce("ReduceMean", mul(b, gh, x_hat), axes))], like=x)
    return (mul(b, inner, inv_std),)


# -- windows: convolution and pooling ----------------------------------------------------------
def _window_geometry(b: B, n: Node, kernel: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int]]:
    """Static (input size, output size, strides, dilations, leading pads, trailing pads) of a window operator."""
    x, y = n.inputs[0], n.outputs[0]
    spatial = len(kernel)
    in_size = list(b.static_shape(x, f"the gradient of {n.op_type}")[2:])
    out_size = list(b.static_shape(y, f"the gradient of {n.op_type}")[2:])
    strides = list(n.attr("strides") or [1] * spatial)  # type: ignore[arg-type]
    dilations = list(n.attr("dilations") or [1] * spatial)  # type: ignore[arg-type]
    auto_pad = n.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        both = list(n.attr("pads") or [0] * 2 * spatial) if auto_pad == "NOTSET" else [0] * 2 * spatial  # type: ignore[arg-type]
        pads, end_pads = both[:spatial], both[spatial:]
        if n.attr("ceil_mode", 0) and any((o - 1) * s >= i + p for o, s, i, p in zip(out_size, strides, in_size, pads)):
            # ONNX shape inference before opset 22 keeps a last window that starts past the input;
            # ONNX Runtime (like ONNX 22 and PyTorch) drops it: the model's static shapes are wrong.
            raise n.unsupported(f"ceil_mode with a last window past the input (inferred output {out_size}): "
                                "ONNX shape inference before opset 22 disagrees with the runtime; export with opset 22")
    else:
        totals = [max((o - 1) * s + (k - 1) * d + 1 - i, 0)
                  for i, o, s, k, d in zip(in_size, out_size, strides, kernel, dilations)]
        pads = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        end_pads = [t - p for t, p in zip(totals, pads)]
    return in_size, out_size, strides, dilations, pads, end_pads


def _scatter_windows(b: B, n: Node, g_merged: str, weight: str, group: int, kernel: Sequence[int]) -> str:
    """ConvTranspose of window gradients, cropped (or zero-padded) back onto the input.

    The transposed convolution covers ``(out - 1) * stride + (k - 1) * dilation + 1`` positions
    starting at the leading pad; the input occupies ``[pad, pad + in)`` of that.
    """
    in_size, out_size, strides, dilations, pads, _ = _window_geometry(b, n, kernel)
    full = b.op("ConvTranspose", [g_merged, weight], strides=strides, dilations=dilations, group=group)
    covered = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out_size, strides, kernel, dilations)]
    ends = [min(p + i, c) for p, i, c in zip(pads, in_size, covered)]
    spatial_axes = list(range(2, 2 + len(kernel)))
    cropped = b.op("Slice", [full, b.ints(pads), b.ints(ends), b.ints(spatial_axes)])
    short = [p + i - e for p, i, e in zip(pads, in_size, ends)]
    if any(short):
        cropped = b.op("Pad", [cropped, b.ints([0] * (2 + len(kernel)) + [0, 0] + short)])
    return b.like_input(cropped, n.inputs[0])


def _conv(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    x, w = n.inputs[:2]
    kernel = list(n.attr("kernel_shape") or b.static_shape(w, "the gradient of Conv")[2:])  # type: ignore[arg-type]
    merged = b.merge_seeds(g[0], n.outputs[0])
    return (_scatter_windows(b, n, merged, w, int(n.attr("group", 1)), kernel), None, None)  # type: ignore[arg-type]


def _channels(b: B, n: Node) -> int:
    return b.static_shape(n.inputs[0], f"the gradient of {n.op_type}")[1]


def _average_pool(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """Each output's gradient is shared by its window: divide by the window's count, scatter ones."""
    kernel = list(n.attr("kernel_shape"))  # type: ignore[arg-type]
    in_size, out_size, strides, dilations, pads, end_pads = _window_geometry(b, n, kernel)
    if any(d != 1 for d in dilations):
        raise n.unsupported("dilated AveragePool")
    include_pad = int(n.attr("count_include_pad", 0))
    counts = np.ones(out_size, dtype=np.float64)
    for axis, (i, o, s, k, p, e) in enumerate(zip(in_size, out_size, strides, kernel, pads, end_pads)):
        start = np.arange(o) * s - p
        lo, hi = (-p, i + e) if include_pad else (0, i)
        valid = np.minimum(start + k, hi) - np.maximum(start, lo)
        counts = counts * valid.reshape([-1 if a == axis else 1 for a in range(len(kernel))])
    divided = b.op("Div", [g[0], b.constant(counts, dtype=b.info(n.inputs[0]).elem_type)], like=g[0])
    channels = _channels(b, n)
    ones = b.constant(np.ones([channels, 1, *kernel]), dtype=b.info(n.inputs[0]).elem_type)
    return (_scatter_windows(b, n, b.merge_seeds(divided, n.outputs[0]), ones, channels, kernel),)


def _max_pool(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """Route each output's gradient to the first maximum of its window (row-major order).

    Built without MaxPool's Indices output (which TensorRT lacks): for every kernel offset,
    the strided view of the padded input is compared with the pooled output; an offset takes
    the gradient where it equals the maximum and no earlier offset did. A grouped ConvTranspose
    with one-hot kernels puts all offsets back in place at once.
    """
    if len(n.outputs) > 1 and n.outputs[1]:
        raise n.unsupported("MaxPool with an Indices output")
    x, y = n.inputs[0], n.outputs[0]
    kernel = list(n.attr("kernel_shape"))  # type: ignore[arg-type]
    in_size, out_size, strides, dilations, pads, _ = _window_geometry(b, n, kernel)
    covered = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out_size, strides, kernel, dilations)]
    after = [max(c - p - i, 0) for c, p, i in zip(covered, pads, in_size)]
    padded = b.op("Pad", [x, b.ints([0, 0, *pads, 0, 0, *after]), b.scalar_like(-np.inf, x)], like=x)
    spatial_axes = list(range(2, 2 + len(kernel)))
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    taken: str | None = None
    routed = []
    for offset in offsets:
        starts = [o * d for o, d in zip(offset, dilations)]
        ends = [s + (o - 1) * st + 1 for s, o, st in zip(starts, out_size, strides)]
        view = b.op("Slice", [padded, b.ints(starts), b.ints(ends), b.ints(spatial_axes), b.ints(strides)])
        equal = b.op("Equal", [view, y])
        first = equal if taken is None else b.op("And", [equal, b.op("Not", [taken])])
        taken = equal if taken is None else b.op("Or", [taken, equal])
        routed.append(b.unsqueeze(where(b, first, g[0], x), [-len(kernel) - 1]))
    stacked = b.concat(routed, -len(kernel) - 1)  # [K, N, C, offsets, *out]
    channels = _channels(b, n)
    merged = b.op("Reshape", [stacked, b.ints([-1, channels * len(offsets), *out_size])])
    one_hot = np.zeros([channels, len(offsets), 1, *kernel])
    for index, offset in enumerate(offsets):
        one_hot[(slice(None), index, 0, *offset)] = 1.0
    weight = b.constant(one_hot.reshape([channels * len(offsets), 1, *kernel]), dtype=b.info(x).elem_type)
    return (_scatter_windows(b, n, merged, weight, channels, kernel),)


def _pad_rule(b: B, n: Node, g: Grads) -> Sequence[str | None]:
    """Constant-mode Pad: crop the gradient back (negative pads are the inverse crop)."""
    if n.attr("mode", "constant") != "constant":
        raise n.unsupported(f"Pad mode {n.attr('mode')!r}")
    pads = input_or_attr(b, n, 1, "pads")
    rank = b.rank(n.inputs[0])
    axes = input_or_attr(b, n, 3, "axes") if len(n.inputs) > 3 else None
    axes = [a % rank for a in axes] if axes else list(range(rank))
    full = [0] * (2 * (rank + 1))
    for j, axis in enumerate(axes):
        full[axis + 1] = -pads[j]  # type: ignore[index]
        full[rank + 1 + axis + 1] = -pads[len(axes) + j]  # type: ignore[index]
    return (b.op("Pad", [g[0], b.ints(full)], like=n.inputs[0]),)


RULES: dict[str, Rule] = {
    # identity-like
    "Identity": lambda b, n, g: (g[0],),
    "Dropout": lambda b, n, g: (g[0], None, None),
    "Cast": lambda b, n, g: (b.op("Cast", [g[0]], to=b.info(n.inputs[0]).elem_type, like=n.inputs[0]),),
    # element-wise
    "Add": lambda b, n, g: _binary(b, n, g[0], g[0]),
    "Sub": _sub,
    "Mul": _mul,
    "Div": _div,
    "Sum": lambda b, n, g: _variadic(b, n, g, [None] * len(n.inputs)),
    "Mean": lambda b, n, g: _variadic(b, n, g, [None] * len(n.inputs), 1.0 / len(n.inputs)),
    "Max": _extremum,
    "Min": _extremum,
    "Where": _where_rule,
    "Expand": lambda b, n, g: (b.unbroadcast(g[0], n.inputs[0], b.shape_of(n.outputs[0])), None),
    "Neg": lambda b, n, g: (b.op("Neg", [g[0]], like=g[0]),),
    # from the output: the input is often a Conv or Add output ONNX Runtime fuses into the Relu
    "Relu": lambda b, n, g: (where(b, compare(b, "Greater", n.outputs[0], 0.0), g[0], n.inputs[0]),),
    "LeakyRelu": lambda b, n, g: (where(b, compare(b, "Greater", n.inputs[0], 0.0), g[0], n.inputs[0],
                                        otherwise=scale(b, g[0], float(n.attr("alpha", 0.01)), n.inputs[0])),),
    "PRelu": lambda b, n, g: (where(b, compare(b, "Greater", n.inputs[0], 0.0), g[0], n.inputs[0],
                                    otherwise=mul(b, g[0], n.inputs[1])), None),
    "Clip": _clip,
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Sigmoid": chain(lambda b, n: mul(b, n.outputs[0], _one_minus(b, n.outputs[0]))),
    "Tanh": chain(lambda b, n: _one_minus(b, mul(b, n.outputs[0], n.outputs[0]))),
    "Exp": chain(lambda b, n: n.outputs[0]),
    "Log": lambda b, n, g: (b.op("Div", [g[0], n.inputs[0]], like=g[0]),),
    "Sqrt": lambda b, n, g: (b.op("Div", [scale(b, g[0], 0.5, n.inputs[0]), n.outputs[0]], like=g[0]),),
    "Reciprocal": chain(lambda b, n: b.op("Neg", [mul(b, n.outputs[0], n.outputs[0])], like=n.inputs[0])),
    "Abs": chain(lambda b, n: b.op("Sign", [n.inputs[0]], like=n.inputs[0])),
    "Softplus": chain(lambda b, n: b.op("Sigmoid", [n.inputs[0]], like=n.inputs[0])),
    "Erf": chain(lambda b, n: _erf_derivative(b, n.inputs[0])),
    "Gelu": chain(_gelu),
    "Pow": _pow,
    # shape and selection
    "Reshape": lambda b, n, g: (*_reshaped(b, n, g), None),
    "Flatten": _reshaped,
    "Squeeze": lambda b, n, g: (*_reshaped(b, n, g), None),
    "Unsqueeze": lambda b, n, g: (*_reshaped(b, n, g), None),
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": lambda b, n, g: (*_split(b, n, g), None),
    "Slice": lambda b, n, g: (*_slice(b, n, g), None, None, None, None),
    "Gather": _gather,
    "Pad": lambda b, n, g: (*_pad_rule(b, n, g), None, None, None),
    # reductions and pooling
    "GlobalAveragePool": _mean,
    "ReduceMean": _mean,
    "ReduceSum": _sum,
    "GlobalMaxPool": _extreme_reduce,
    "ReduceMax": _extreme_reduce,
    "ReduceMin": _extreme_reduce,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
    # linear algebra and normalisation
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "BatchNormalization": lambda b, n, g: (*_batch_norm(b, n, g), None, None, None, None),
    "LayerNormalization": lambda b, n, g: (*_layer_norm(b, n, g), None, None),
}
